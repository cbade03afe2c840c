# CPU, the embedded teacher shipped in data/embedded_teacher.pt, the generated embedded dataset:
# the README's MD demo (4 min), its fine-tuning recipe cut to 6 epochs (1.5 min per init),
# curvature on one batch of 64 images (its gradient graph then serves every product).
# About 14 minutes on 2 idle CPU cores in all (12 before the FD-lr fine-tune was added).
TEACHERS=${TEACHERS:-embedded}
DATA=embedded
LAUNCH=python
MD_ARGS="config/md_embedded.py"
FT_ARGS="config/ft_embedded.py --epochs=6"
FD_LR=1e-2               # a stand-in for FD's higher lr: 10x the recipe's 1e-3
SHARPNESS_EVERY=0        # no sharpness curve during fine-tuning (it would double the time)
ANALYZE_ARGS="--n_images=256 --batch_size=64"
HESSIAN_ARGS="--n_images=64 --batch_size=64 --lanczos_steps=40 --trace_products=40"
LANDSCAPE_ARGS="--n_images=64 --batch_size=64 --steps=7 --lanczos_steps=40"
SHAPE_DATA=embedded      # its cue_conflict/ split
SHAPE_TEACHERS=${SHAPE_TEACHERS-embedded}  # teachers that are classifiers of the cue-conflict categories
OOD_DATA=""
