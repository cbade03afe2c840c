# Fine-tuning on the embedded dataset, 2 CPU cores, about 2 minutes. Pick the init on the
# command line:
#   python finetune.py config/ft_embedded.py --init=out/md_embedded/ckpt.pt --out_dir=out/ft_md
#   python finetune.py config/ft_embedded.py --init=embedded --out_dir=out/ft_teacher
#   python finetune.py config/ft_embedded.py --init=scratch --out_dir=out/ft_scratch
# The Table 1 recipe, scaled to a small model and a small dataset (batch, lr, epochs, layer decay).
data_dir = "embedded"
model = "tiny/4"
img_size = 32
epochs = 10
warmup_epochs = 1
total_batch_size = 128
micro_batch_size = 128
lr = 1e-3
min_lr = 1e-6
layer_decay = 0.75
eval_interval = 0
log_interval = 30
num_workers = 1
device = "cpu"
dtype = "float32"
compile = False
