# One GPU: MD from the official CLIP, DINO and DeiT ViT-B/16 into a ViT-B/16 student on the real
# 10-class Imagenette (python -m data.prepare_imagenette). The paper's recipes, shortened (MD 100
# epochs) and at batch 256 with the learning rates scaled linearly from the paper's batches
# (MD 1.5e-3 at 2048, fine-tuning 5e-5 at 1024). An estimate from FLOPs, not measured: about 1-2
# hours on one H100.
TEACHERS=${TEACHERS:-clip dino deit}
DATA=data/imagenette
DATA_HOW="python -m data.prepare_imagenette downloads it (about 340 MB)"
LAUNCH=python
MD_ARGS="--epochs=100 --warmup_epochs=10 --total_batch_size=256 --lr=1.875e-4 --num_workers=12"
FT_ARGS="--total_batch_size=256 --lr=1.25e-5 --num_workers=12"
FD_LR=6.25e-4            # FD's fine-tuning lr (1.25e-3 per 512 images) at batch 256: 50x the recipe's
SHARPNESS_EVERY=200
ANALYZE_ARGS="--n_images=1000 --batch_size=64"
HESSIAN_ARGS="--n_images=256 --batch_size=64"
LANDSCAPE_ARGS="--n_images=256 --batch_size=64 --steps=21"
SHAPE_DATA=""            # none: Imagenette's 10 classes are not the 16 cue-conflict categories
OOD_DATA=""              # none, for the same reason
