# The embedded scale cut to a few iterations and images: every step of the pipeline in a few
# minutes, to check it (the numbers mean nothing). The sharpness logs take most of the time.
TEACHERS=${TEACHERS:-embedded}
DATA=embedded
LAUNCH=python
MD_ARGS="config/md_embedded.py --stop_iter=3 --eval_images=64"
FT_ARGS="config/ft_embedded.py --stop_iter=2 --total_batch_size=32 --micro_batch_size=32"
FD_LR=1e-2
SHARPNESS_EVERY=2
ANALYZE_ARGS="--n_images=16"
HESSIAN_ARGS="--n_images=16 --lanczos_steps=3 --trace_products=4"
LANDSCAPE_ARGS="--n_images=16 --steps=3 --lanczos_steps=3"
SHAPE_DATA=embedded
SHAPE_TEACHERS=${SHAPE_TEACHERS-embedded}
OOD_DATA=""
