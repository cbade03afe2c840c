"""VQ-KD tokenizer: straight-through gradient, EMA codebook, dead codes, usage."""
import math

import pytest
import torch

from common import CheckpointError
from model import ViTConfig
from vqkd import VQKD, codebook_usage, load_tokenizer

from tests import forkserver


def tokenizer(K=16, initialized=True, **kw):
    torch.manual_seed(0)
    vq = VQKD(ViTConfig.from_name("nano/4"), teacher_dim=12, codebook_size=K, code_dim=4, **kw)
    vq.initialized.fill_(initialized)
    return vq


def test_a_tokenizer_file_with_bad_model_args_is_refused_by_name(tmp_path):
    """the checks of teacher.config_of: a value of the wrong type, a field missing"""
    vq = tokenizer()
    args = ViTConfig.from_name("nano/4").to_dict()
    wrong_type = args | dict(depth="six")
    no_mean = {k: v for k, v in args.items() if k != "mean"}
    for args, message in ((wrong_type, "depth='six', expected int"), (no_mean, "no 'mean'")):
        path = tmp_path / "tokenizer.pt"
        torch.save(dict(model=vq.state_dict(), vqkd_args=vq.config, model_args=args), path)
        with pytest.raises(CheckpointError, match=f"model_args this version cannot read: {message}"):
            load_tokenizer(str(path))



def test_a_tokenizer_whose_weights_do_not_fit_its_settings_is_one_error(tmp_path):
    """settings and weights that disagree (a codebook size edited, an unknown setting, a block more in
    model_args than in the weights): a CheckpointError naming the file, which the scripts print as one
    line; before, torch's traceback"""
    vq = tokenizer()
    args = ViTConfig.from_name("nano/4").to_dict()
    cases = [(vq.config | dict(codebook_size=2 * vq.config["codebook_size"]), args, "size mismatch for codebook"),
             (vq.config | dict(foo=1), args, "unexpected keyword argument 'foo'"),
             (vq.config, args | dict(depth=args["depth"] + 1), "Missing key"),
             ({k: v for k, v in vq.config.items() if k != "teacher_dim"}, args, "missing 1 required")]
    for vqkd_args, model_args, reason in cases:
        path = tmp_path / "tokenizer.pt"
        torch.save(dict(model=vq.state_dict(), vqkd_args=vqkd_args, model_args=model_args), path)
        with pytest.raises(CheckpointError, match=f"'{path}' is a VQ-KD tokenizer whose weights do not fit "
                                                  f"its own settings .*{reason}"):
            load_tokenizer(str(path))

def test_an_exported_tokenizer_is_still_a_tokenizer(tmp_path):
    """teacher.py export of a train_vqkd.py file (its entries as that script saves them) drops the
    optimizer and keeps what load_tokenizer reads; before, vqkd_args was dropped too"""
    from teacher import export_weights
    vq = tokenizer()
    src, dst = tmp_path / "tokenizer.pt", tmp_path / "exported.pt"
    optimizer = torch.optim.AdamW(vq.parameters())
    torch.save(dict(model=vq.state_dict(), vqkd_args=vq.config, model_args=ViTConfig.from_name("nano/4").to_dict(),
                    config={}, optimizer=optimizer.state_dict(), iter_num=3, counts=torch.zeros(16)), src)
    export_weights(str(src), str(dst))
    assert "optimizer" not in torch.load(dst, weights_only=True)
    loaded = load_tokenizer(str(dst)).state_dict()
    assert loaded.keys() == vq.state_dict().keys()
    assert all(torch.equal(loaded[k], v) for k, v in vq.state_dict().items())


def test_a_tokenizer_given_as_a_vit_says_what_it_is(tmp_path):
    """a tokenizer.pt given as --teacher or --init: before, a list of missing keys"""
    from teacher import load_model
    vq = tokenizer()
    path = tmp_path / "tokenizer.pt"
    torch.save(dict(model=vq.state_dict(), vqkd_args=vq.config, model_args=ViTConfig.from_name("nano/4").to_dict(),
                    config={}), path)
    with pytest.raises(CheckpointError, match=f"'{path}' is a VQ-KD tokenizer .*--tokenizer={path}"):
        load_model(str(path))


def test_a_tokenizer_with_nan_weights_is_refused_by_name(tmp_path):
    """before, MD on its codes ran and stopped later on a NaN loss"""
    vq = tokenizer()
    state = vq.state_dict()
    name = next(k for k, v in state.items() if v.is_floating_point() and v.dim() == 2)
    state[name][0, 0] = float("nan")
    path = tmp_path / "tokenizer.pt"
    torch.save(dict(model=state, vqkd_args=vq.config, model_args=ViTConfig.from_name("nano/4").to_dict()), path)
    with pytest.raises(CheckpointError, match=f"'{path}' has non-finite \\(NaN/inf\\) weights, first in {name}:"):
        load_tokenizer(str(path))


def test_weight_decay_groups_follow_beit_v2s_skip_list():
    """as train_vqkd.py builds its optimizer; BEiT v2's VQKD.no_weight_decay skips the encoder's and the
    decoder's cls_token and pos_embed (ours: decoder_pos), and AdamW groups skip every 1-d tensor"""
    vq = VQKD(ViTConfig.beit_v2("nano/4", img_size=32), 96, 64, 8, 1, 0.99, 1e-3)
    other = [(n, p) for n, p in vq.named_parameters() if not n.startswith("encoder.")]
    groups = vq.encoder.param_groups(1e-4, extra=other)
    decay = {name: g["weight_decay"] for g in groups for name in g["names"]}
    skipped = {"cls_token", "pos_embed", "decoder_pos"}
    named = [*vq.encoder.named_parameters(), *other]
    assert sorted(decay) == sorted(n for n, _ in named)
    for name, p in named:
        assert decay[name] == (0.0 if p.ndim == 1 or name in skipped else 1e-4), name


def test_codebook_starts_on_distinct_first_batch_vectors_before_they_are_quantized():
    """the first training batch: the 64 codes are 64 distinct ones of its 128 vectors (before: drawn
    with
    replacement, so repeated codes that could never win), and that batch's codes are those of the
    new codebook
    (before: of the random one): each drawn vector's code is its own (cosine 1), its commitment term
    0"""
    # decay 1: the EMA leaves the codebook as initialized
    vq = tokenizer(K=64, initialized=False, decay=1.0)
    images, targets = torch.rand(2, 3, 32, 32), torch.randn(2, 64, 12)
    # the vectors the forward computes (its weights do not change)
    z = vq.code_vectors(images).reshape(-1, 4)
    _, codes = vq(images, targets)
    assert bool(vq.initialized)
    similarity = vq.codebook @ z.T  # (codes, vectors)
    source = similarity.argmax(1)  # the vector each code was drawn from
    assert torch.allclose(similarity.max(1).values, torch.ones(64), atol=1e-5)
    assert len(set(source.tolist())) == 64
    assert torch.equal(codes.reshape(-1)[source], torch.arange(64))


def test_codes_are_the_nearest_entries_by_cosine():
    vq = tokenizer()
    z, codes = vq.encode(torch.rand(2, 3, 32, 32))
    assert z.shape == (2, 64, 4) and codes.shape == (2, 64)
    assert torch.allclose(z.norm(dim=-1), torch.ones(2, 64), atol=1e-5)
    sims = torch.einsum("bnc,kc->bnk", z, vq.codebook)
    assert torch.equal(codes, sims.argmax(-1))


def test_codes_are_scored_in_fp32_under_bf16_autocast():
    """two codes 1e-3 apart in cosine to a vector: bf16 scores tie them, and argmax took the first
    (code 0); the codes under autocast are the fp32 ones (train_md's targets and its val targets no
    longer depend on
    --dtype)"""
    vq = tokenizer(K=2)
    z = torch.nn.functional.normalize(torch.tensor([[[1.0, 0.5, 0.25, 0.0]]]), dim=-1)
    farther = torch.nn.functional.normalize(z[0, 0] + torch.tensor([0.0, 0.0, 0.0, 0.06]), dim=0)
    nearer = torch.nn.functional.normalize(z[0, 0] + torch.tensor([0.0, 0.0, 0.0, 0.02]), dim=0)
    vq.codebook.copy_(torch.stack([farther, nearer]))
    cosines = (vq.codebook.double() @ z[0, 0].double()).tolist()
    assert (cosines[1] > cosines[0]
            and torch.tensor(cosines, dtype=torch.bfloat16).unique().numel() == 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert vq.nearest(z).item() == 1


def test_commitment_is_the_mean_squared_error_of_z_and_its_code():
    """BEiT v2's beta x F.mse_loss(z_q.detach(), z): the mean over patches and code dimensions
    (before: the sum over the code dimensions, code_dim x the reference's); the difference of two
    commitment weights, computed
    from the encoder's own vectors and codes"""
    vq = tokenizer()
    vq.eval()
    images, targets = torch.rand(2, 3, 32, 32), torch.randn(2, 64, 12)
    z, codes = vq.encode(images)
    expected = sum(((a - b) ** 2) for a, b in zip(z.flatten().tolist(),
                                                  vq.codebook[codes].flatten().tolist()))
    expected /= z.numel()
    difference = vq(images, targets, commitment=3.0)[0] - vq(images, targets, commitment=1.0)[0]
    assert difference.item() == pytest.approx(2 * expected, rel=1e-4)


def test_straight_through_passes_the_gradient_to_the_encoder():
    vq = tokenizer()
    vq.eval()  # no EMA update: the codebook stays fixed during the check
    images, targets = torch.rand(2, 3, 32, 32), torch.randn(2, 64, 12)
    z, codes = vq.encode(images)
    q = vq.codebook[codes]
    z_leaf = z.detach().requires_grad_(True)
    q_leaf = q.clone().requires_grad_(True)
    # the reconstruction loss through the straight-through value ...
    rebuilt = vq.decode(z_leaf + (q - z_leaf).detach())
    loss_st = 1 - torch.nn.functional.cosine_similarity(rebuilt, targets, dim=-1).mean()
    loss_st.backward()
    # ... has, at z, exactly the gradient the same loss has at q
    loss_q = 1 - torch.nn.functional.cosine_similarity(vq.decode(q_leaf), targets, dim=-1).mean()
    loss_q.backward()
    assert z_leaf.grad.abs().sum() > 0 and torch.allclose(z_leaf.grad, q_leaf.grad, atol=1e-6)
    # and the whole loss reaches the encoder's weights
    vq.zero_grad()
    vq(images, targets)[0].backward()
    assert vq.encoder.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_ema_moves_a_code_toward_its_assigned_vectors():
    vq = tokenizer(K=4, decay=0.5, dead_threshold=0.0)
    direction = torch.nn.functional.normalize(torch.tensor([1.0, 1.0, 0.0, 0.0]), dim=0)
    z = direction.expand(1, 10, 4).clone()
    k = int((z[0, 0] @ vq.codebook.T).argmax())
    before = float(vq.codebook[k] @ direction)
    old_sum = vq.ema_sum[k].clone()
    vq.ema_update(z, torch.full((1, 10), k))
    after = float(vq.codebook[k] @ direction)
    assert after > before
    # decay 0.5: the new sum is half the old sum plus half the sum of the 10 assigned vectors
    expected = torch.nn.functional.normalize(0.5 * old_sum + 0.5 * 10 * direction, dim=0)
    assert torch.allclose(vq.codebook[k], expected, atol=1e-6)


def test_dead_codes_are_restarted_on_batch_vectors():
    vq = tokenizer(K=8, decay=0.5, dead_threshold=0.5)
    z = torch.nn.functional.normalize(torch.randn(1, 20, 4), dim=-1)
    for _ in range(10):  # every assignment goes to code 0: the others starve
        vq.ema_update(z, torch.zeros(1, 20, dtype=torch.long))
    restarted = vq.codebook[1:]
    # each restarted code is one of the batch vectors
    one = torch.tensor(1.0)
    assert all(torch.isclose(restarted[i] @ z[0].T, one, atol=1e-5).any() for i in range(7))


def test_ema_count_is_the_decayed_share_of_assignments():
    """ema_count after n updates with the same assignment, against the recurrence's closed form:
    c_n = d c_(n-1) + (1 - d) share, c_0 = 1 / K  =>  c_n = d^n / K + (1 - d^n) share,
    share = the fraction of the batch's vectors assigned to each code (here 6, 3, 1, 0 of 10)"""
    K, d, n = 4, 0.5, 5
    vq = tokenizer(K=K, decay=d, dead_threshold=0.0)
    z = torch.nn.functional.normalize(torch.randn(1, 10, 4), dim=-1)
    codes = torch.tensor([[0] * 6 + [1] * 3 + [2]])
    for _ in range(n):
        vq.ema_update(z, codes, weight=0.5)  # the weight scales counts, not shares
    share = torch.tensor([0.6, 0.3, 0.1, 0.0])
    assert torch.allclose(vq.ema_count, d ** n / K + (1 - d ** n) * share, atol=1e-6)


def test_a_code_restarts_below_the_dead_threshold_and_not_above():
    """one update, decay 1/2, from c_0 = 1/K = 1/4 with shares (10, 6, 3, 1) / 20:
    c_1 = 1/8 + share / 2 = (0.375, 0.275, 0.2, 0.15); threshold 0.7 / K = 0.175, so code 2
    (0.2) is kept and code 3 (0.15) is dead: its count is reset to 1/K and its entry (and EMA
    sum) becomes one of the batch's vectors; the live codes are normalized EMA sums"""
    K = 4
    vq = tokenizer(K=K, decay=0.5, dead_threshold=0.7)
    z = torch.nn.functional.normalize(torch.randn(1, 20, 4), dim=-1)
    codes = torch.tensor([[0] * 10 + [1] * 6 + [2] * 3 + [3]])
    old_sum = vq.ema_sum.clone()
    vq.ema_update(z, codes)
    assert torch.allclose(vq.ema_count, torch.tensor([0.375, 0.275, 0.2, 1 / K]), atol=1e-6)
    for k in range(3):  # sum_k = (old sum + sum of its assigned vectors) / 2
        new_sum = 0.5 * old_sum[k] + 0.5 * z[0, codes[0] == k].sum(0)
        assert torch.allclose(vq.codebook[k], torch.nn.functional.normalize(new_sum, dim=0),
                              atol=1e-6)
    assert torch.isclose(vq.codebook[3] @ z[0].T, torch.tensor(1.0), atol=1e-6).any()
    assert torch.equal(vq.ema_sum[3], vq.codebook[3])


def test_codebook_usage_and_perplexity():
    used, perplexity = codebook_usage(torch.tensor([5, 5, 0, 0]))
    assert used == 0.5 and perplexity == pytest.approx(2.0)
    used, perplexity = codebook_usage(torch.tensor([1, 1, 1, 1]))
    assert used == 1.0 and perplexity == pytest.approx(4.0)
    assert codebook_usage(torch.tensor([9, 0, 0, 0]))[1] == pytest.approx(1.0)


def test_tokenizer_training_lowers_its_loss():
    vq = tokenizer(K=32)
    images, targets = torch.rand(4, 3, 32, 32), torch.randn(4, 64, 12)
    opt = torch.optim.AdamW(vq.parameters(), lr=3e-3)
    first = vq(images, targets)[0].item()
    for _ in range(15):
        opt.zero_grad()
        loss, _ = vq(images, targets)
        loss.backward()
        opt.step()
    assert vq(images, targets)[0].item() < first
    assert math.isfinite(first)


def test_tokenizer_then_md_on_codes_from_the_command_line(tiny_data, tiny_teacher, tmp_path):
    import os
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    common = [f"--data_dir={tiny_data}", "--img_size=32", "--total_batch_size=16", "--micro_batch_size=8",
              "--num_workers=0", "--device=cpu", "--dtype=float32", "--log_interval=2", "--epochs=1"]
    tokenizer_args = [f"--teacher={tiny_teacher}", "--model=nano/4", "--codebook_size=4096",
                      "--stop_iter=4",
                      "--collapse_threshold=0.99", f"--out_dir={tmp_path / 'tok'}"]
    r = forkserver.run([sys.executable, "train_vqkd.py", *common, *tokenizer_args],
                       capture_output=True, text=True, cwd=root, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    out = r.stdout + r.stderr
    # 4096 codes, 2048 assignments between log lines: at most half in use whatever the tokenizer
    # does, under the
    # threshold of 99%; this checks that the log line says so
    assert "codebook usage" in out and "perplexity" in out and "COLLAPSE" in out
    md_args = ["--target=vqkd", f"--tokenizer={tmp_path / 'tok' / 'tokenizer.pt'}", "--model=nano/4",
               "--compile=False", "--stop_iter=2", f"--out_dir={tmp_path / 'md'}"]
    r = forkserver.run([sys.executable, "train_md.py", *common, *md_args],
                       capture_output=True, text=True, cwd=root, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    ckpt = torch.load(tmp_path / "md" / "ckpt.pt", weights_only=True)
    assert ckpt["decoder"]["out.weight"].shape[0] == 4096  # logits over the 4096 codes
    assert 0 < ckpt["best_val_loss"] < 2 * math.log(4096)


def test_ema_step_keeps_decay_times_the_old_state_at_an_asymmetric_decay():
    """One EMA step at decay 0.9 against its closed form (decay 0.5 cannot tell d from 1 - d):
    sum_k = 0.9 old sum_k + 0.1 (sum of the vectors assigned to k), code_k = sum_k / |sum_k|,
    count_k = 0.9 / K + 0.1 share_k (shares 6, 4, 2, 0 of 12; code 3 gets no vector)"""
    K, d = 4, 0.9
    vq = tokenizer(K=K, decay=d, dead_threshold=0.0)
    g = torch.Generator().manual_seed(1)
    z = torch.nn.functional.normalize(torch.randn(1, 12, 4, generator=g), dim=-1)
    codes = torch.tensor([[0] * 6 + [1] * 4 + [2] * 2])
    old_sum = vq.ema_sum.clone()
    vq.ema_update(z, codes)
    for k in range(K):
        expected = d * old_sum[k] + (1 - d) * z[0, codes[0] == k].sum(0)
        assert torch.allclose(vq.ema_sum[k], expected, atol=1e-6), k
        assert torch.allclose(vq.codebook[k], expected / expected.norm(), atol=1e-6), k
    share = torch.tensor([6, 4, 2, 0]) / 12
    assert torch.allclose(vq.ema_count, d / K + (1 - d) * share, atol=1e-6)


def test_commitment_gradient_reaches_the_encoder_not_the_codebook():
    """BEiT v2's beta x mse(z, sg(q)): the gradient of the commitment term pulls the encoder's
    vectors toward their fixed codes. Truth: the encoder's gradient at commitment 3 minus that at
    commitment 1 is 2 x the gradient of mean((z - q)^2) taken by hand, with q the codebook rows of
    the largest cosine (a constant)"""
    vq = tokenizer()
    vq.eval()  # no EMA update: the codebook stays fixed
    g = torch.Generator().manual_seed(2)
    images, targets = torch.rand(2, 3, 32, 32, generator=g), torch.randn(2, 64, 12, generator=g)
    weight = vq.to_code[2].weight

    def grad_of(loss):
        vq.zero_grad()
        loss.backward()
        return weight.grad.clone()

    difference = grad_of(vq(images, targets, commitment=3.0)[0]) - grad_of(vq(images, targets)[0])
    z = vq.code_vectors(images)
    q = vq.codebook[(z.detach() @ vq.codebook.T).argmax(-1)].clone()
    by_hand = grad_of(((z - q) ** 2).mean())
    assert by_hand.abs().max() > 1e-4
    assert torch.allclose(difference, 2 * by_hand, atol=1e-6, rtol=1e-4)


def test_reconstruction_loss_is_one_minus_the_mean_cosine_per_patch():
    """commitment 0: the loss is 1 - the mean over patches of the cosine between a decoded patch
    and the teacher's patch, over the teacher's channels, computed by hand from dot products and
    norms (teacher patches of very different norms: the cosine ignores them)"""
    vq = tokenizer()
    vq.eval()
    g = torch.Generator().manual_seed(3)
    images = torch.rand(2, 3, 32, 32, generator=g)
    norms = torch.rand(2, 64, 1, generator=g) * 10 + 0.1
    targets = torch.randn(2, 64, 12, generator=g) * norms
    loss, codes = vq(images, targets, commitment=0.0)
    with torch.no_grad():
        rebuilt = vq.decode(vq.codebook[codes])
    cosine = (rebuilt * targets).sum(-1) / (rebuilt.norm(dim=-1) * targets.norm(dim=-1))
    assert loss.item() == pytest.approx(1 - cosine.mean().item(), abs=1e-6)


def test_a_codebook_as_large_as_the_first_batch_takes_each_of_its_vectors_once():
    """K = 128 codes initialized from a batch of 128 vectors: the codebook is those 128 vectors,
    each exactly once (a permutation; 128 draws with replacement repeat one with probability
    1 - 128! / 128^128, about 1)"""
    vq = tokenizer(K=128, initialized=False)
    g = torch.Generator().manual_seed(4)
    z = torch.nn.functional.normalize(torch.randn(2, 64, 4, generator=g), dim=-1)
    vq.initialize(z)
    same = (vq.codebook[:, None, :] == z.reshape(1, 128, 4)).all(-1)  # (codes, vectors)
    assert torch.equal(same.sum(0), torch.ones(128, dtype=torch.long))
    assert torch.equal(same.sum(1), torch.ones(128, dtype=torch.long))


def test_tokenizer_run_logs_the_warmup_lr_and_saves_the_codes_since_the_last_log_line(
        tiny_data, tiny_teacher, tmp_path):
    """train_vqkd.py on 144 images in steps of 16: 9 iterations an epoch, a warmup of 1 epoch, so
    step i runs at lr (i + 1) / 9: the log line at iteration 2 (step 1) says 2/9 of --lr, and the
    saved AdamW groups hold step 2's 3/9. Logging every 2 iterations and stopped at 3, the saved
    counts are iteration 3's codes alone: one per patch of its 16 images, 16 x 64 = 1024"""
    import json
    import os
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    args = [f"--data_dir={tiny_data}", f"--teacher={tiny_teacher}", "--model=nano/4",
            "--img_size=32", "--epochs=3", "--warmup_epochs=1", "--total_batch_size=16",
            "--micro_batch_size=8", "--codebook_size=64", "--lr=1e-3", "--log_interval=2",
            "--stop_iter=3", "--num_workers=0", "--device=cpu", "--dtype=float32",
            f"--out_dir={tmp_path}"]
    r = forkserver.run([sys.executable, "train_vqkd.py", *args], capture_output=True, text=True,
                       cwd=root, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-2000:]
    (record,) = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    assert record["iter"] == 2 and record["lr"] == pytest.approx(1e-3 * 2 / 9, rel=1e-12)
    ckpt = torch.load(tmp_path / "tokenizer.pt", weights_only=True)
    assert ckpt["iter_num"] == 3
    groups = ckpt["optimizer"]["param_groups"]
    assert groups and all(g["lr"] == pytest.approx(1e-3 * 3 / 9, rel=1e-12) for g in groups)
    assert ckpt["counts"].shape == (64,) and ckpt["counts"].sum().item() == 16 * 64
