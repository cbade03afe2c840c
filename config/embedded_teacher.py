# The embedded teacher: a small ViT trained supervised from scratch on the embedded dataset
# (a DeiT-like teacher). 2 CPU cores, about 4 minutes. The shipped data/embedded_teacher.pt
# was made by an earlier finetune.py with exactly (rerun today, this makes another file):
#   python finetune.py config/embedded_teacher.py
#   python teacher.py export out/embedded_teacher/ckpt.pt data/embedded_teacher.pt
# (val top-1 96.8% after 30 epochs; chance is 16.7%), with the fine-tuning head and weight decay of
# that time (final norm kept, no decay on relative position tables); today's finetune.py makes a
# 97.0% teacher from this file, another one
out_dir = "out/embedded_teacher"
data_dir = "embedded"
init = "scratch"
model = "tiny/4"
img_size = 32
epochs = 30
warmup_epochs = 2
total_batch_size = 128
micro_batch_size = 128
lr = 1e-3
min_lr = 1e-5
layer_decay = 1.0
weight_decay = 0.05
beta2 = 0.999
randaug = ""
reprob = 0.0
min_crop_scale = 0.35
eval_interval = 90
log_interval = 30
num_workers = 1
device = "cpu"
dtype = "float32"
compile = False
