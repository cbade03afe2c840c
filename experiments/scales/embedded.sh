# CPU, the embedded teacher shipped in data/embedded_teacher.pt, the generated embedded dataset:
# the README's demo (MD, 3 min) and fine-tuning recipe (2 min per init), analysis on fewer images.
TEACHERS=${TEACHERS:-embedded}
DATA=embedded
LAUNCH=python
MD_ARGS="config/md_embedded.py"
FT_ARGS="config/ft_embedded.py"
SHARPNESS_EVERY=0        # no sharpness curve during fine-tuning (it would double the time)
ANALYZE_ARGS="--n_images=256 --batch_size=64"
HESSIAN_ARGS="--n_images=128 --batch_size=64 --lanczos_steps=40 --trace_products=40"
LANDSCAPE_ARGS="--n_images=64 --batch_size=64 --steps=9 --lanczos_steps=40"
SHAPE_DATA=embedded      # its cue_conflict/ split
SHAPE_TEACHERS=embedded  # teachers that are classifiers of the cue-conflict categories
OOD_DATA=""
