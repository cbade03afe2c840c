# The paper: ImageNet-1k, 8 GPUs, every recipe at its defaults (Table 1: MD 300 epochs at batch
# 2048, fine-tuning 50 epochs at batch 1024, lr 5e-5, layer decay 0.6). Shape bias on the
# texture-vs-shape cue-conflict images, OOD on model-vs-human's 17 datasets (both optional).
TEACHERS=${TEACHERS:-clip dino deit}
DATA=data/imagenet
DATA_HOW="put ImageNet-1k there in the ImageFolder layout (train/ and val/ of <wnid>/*.JPEG)"
LAUNCH="torchrun --nproc_per_node=8"
MD_ARGS=""
FT_ARGS=""
FD_LR=2.5e-3             # better baseline: CLIP also fine-tuned at FD's lr (1.25e-3 per 512 images) at batch 1024
SHARPNESS_EVERY=500
ANALYZE_ARGS="--n_images=1000 --batch_size=64"
HESSIAN_ARGS="--n_images=1000 --batch_size=100"
LANDSCAPE_ARGS="--n_images=1000 --batch_size=100 --steps=21"
SHAPE_DATA=data/texture-vs-shape/stimuli/style-transfer-preprocessed-512
SHAPE_HOW="git clone https://github.com/rgeirhos/texture-vs-shape data/texture-vs-shape"
SHAPE_TEACHERS=${SHAPE_TEACHERS-deit}  # the teacher that is an ImageNet classifier, before fine-tuning
OOD_DATA=data/model-vs-human/datasets
OOD_HUMAN=data/model-vs-human/raw-data
OOD_HOW="put model-vs-human's datasets/ and raw-data/ (github.com/bethgelab/model-vs-human) there"
