# MD on the embedded dataset, 2 CPU cores, no network, about 3 minutes:
#   python train_md.py config/md_embedded.py
# The teacher is the small supervised ViT shipped in data/embedded_teacher.pt.
out_dir = "out/md_embedded"
data_dir = "embedded"
teacher = "embedded"
teacher_bf16 = False
model = "tiny/4"
img_size = 32
epochs = 12
warmup_epochs = 1
total_batch_size = 64
micro_batch_size = 64
lr = 1.5e-3
min_lr = 1e-5
beta1 = 0.9
beta2 = 0.98
eval_interval = 75
eval_images = 600
log_interval = 10
num_workers = 1
device = "cpu"
dtype = "float32"
compile = False
