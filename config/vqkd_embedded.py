# The VQ-KD tokenizer on the embedded dataset, 2 CPU cores, a few minutes:
#   python train_vqkd.py config/vqkd_embedded.py
# then MD on its codes:
#   python train_md.py config/md_embedded.py --target=vqkd \
#       --tokenizer=out/vqkd_embedded/tokenizer.pt --out_dir=out/md_vqkd
out_dir = "out/vqkd_embedded"
data_dir = "embedded"
teacher = "embedded"
model = "tiny/4"
img_size = 32
codebook_size = 512
ema_decay = 0.9               # faster than 0.99: a short run, and dead codes restart sooner
epochs = 8
warmup_epochs = 1
total_batch_size = 64
micro_batch_size = 64
lr = 1e-3
log_interval = 37
save_interval = 100
num_workers = 1
device = "cpu"
dtype = "float32"
