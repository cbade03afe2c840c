"""analyze.py --metric report: the paper's claims tested on small fixed JSON files, in the formats
analyze.py and finetune.py write, whose verdicts are known by construction."""
import json
import math
import os
import re

import pytest

import analyze

DEPTH, HEADS = 6, 3  # the last third of 6 blocks: blocks 5 and 6


def layers(low, high):
    """per-block values: `low` for blocks 1-4, `high` for blocks 5-6"""
    return [low] * 4 + [high] * 2


def heads(low, high):
    """per-head values per block: the heads of blocks 1-4, then of blocks 5-6"""
    return [list(low)] * 4 + [list(high)] * 2


def write_json(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f)


def write_metric(root, group, metric, models):
    """analyze.py's layout: {"metric", "settings", "models": {label: entry}}; a figure beside"""
    settings = dict(data="embedded", n_images=16, seed=0)
    write_json(os.path.join(root, "analysis", group, f"{metric}.json"),
               dict(metric=metric, settings=settings, models=models))
    open(os.path.join(root, "analysis", group, f"{metric}.png"), "wb").close()


def per_layer_entry(values):
    return dict(per_layer=values, per_head=[[v] * HEADS for v in values])


def make_run(root, teachers, holds):
    """A run of experiments/paper.sh in miniature. With holds=True every claim holds by its rule;
    with holds=False every one fails. Where it can, the student's numbers go the other way in
    the low layers, so that a rule over the wrong blocks (all, or the first) gets it wrong."""
    def either(if_holds, if_fails):
        return if_holds if holds else if_fails

    pre = {m: {} for m in ("attn_distance", "attn_entropy", "nmi", "fourier", "svd")}
    hessian, shape, finetunes = {}, {}, {}
    for t in teachers:
        md = "md_" + t
        # attention distance, head mean (px): the teacher 10 everywhere
        pre["attn_distance"][t] = per_layer_entry(layers(10.0, 10.0))
        pre["attn_distance"][md] = per_layer_entry(either(layers(20.0, 8.0), layers(5.0, 12.0)))
        # entropy: head mean 3.0 everywhere; spread over heads 0.816 (narrow) or 1.63 (wide)
        narrow, wide = (2.0, 3.0, 4.0), (1.0, 3.0, 5.0)
        pre["attn_entropy"][t] = dict(per_layer=layers(3.0, 3.0), per_head=heads(wide, narrow))
        pre["attn_entropy"][md] = dict(per_layer=layers(3.0, 3.0),
                                       per_head=either(heads(narrow, wide), heads(wide, narrow)))
        pre["nmi"][t] = per_layer_entry(layers(0.2, 0.05))
        pre["nmi"][md] = per_layer_entry(either(layers(0.1, 0.1), layers(0.3, 0.02)))
        # Fourier: Δ log amplitude at the highest frequency
        pre["fourier"][t] = dict(per_layer=layers(-1.0, -1.0), embedding=0.0)
        pre["fourier"][md] = dict(per_layer=either(layers(0.0, -2.0), layers(-2.0, -0.5)),
                                  embedding=0.0)
        # token svd headline: the teacher folds (-8 -> -10, change -2); the student's high blocks
        # are lower than the teacher's in the holding set, but fall less with depth (-0.5)
        pre["svd"][t] = dict(per_layer=layers(-8.0, -10.0))
        pre["svd"][md] = dict(per_layer=either(layers(-10.0, -10.5), layers(-9.0, -12.0)))
        # after fine-tuning: the MD student against the teacher fine-tuned directly; failing,
        # only the trace is larger in magnitude (negative: a signed comparison would pass it)
        hessian["ft_" + t] = dict(eigenvalues=[100.0, 50.0], trace=500.0, trace_stderr=5.0)
        hessian["ft_md_" + t] = dict(eigenvalues=[60.0, 30.0], trace=either(300.0, -700.0),
                                     trace_stderr=5.0)
        for label, bias in ((t, 0.5), ("ft_" + t, 0.2), ("ft_md_" + t, either(0.35, 0.1))):
            shape[label] = dict(shape_bias=bias, per_class={}, images=10, excluded_agreeing=2)
        finetunes["ft_" + t] = (t, 97.0)
        finetunes[f"ft_{t}_fd_lr"] = (t, either(80.0, 99.0))  # the same at FD's higher lr
        finetunes["ft_md_" + t] = (f"out/md_{t}/ckpt.pt", either(83.0, 99.0))
    hessian["ft_scratch"] = dict(eigenvalues=[170.0, 90.0], trace=3000.0, trace_stderr=30.0)
    finetunes["ft_scratch"] = ("scratch", 60.0)
    for metric, models in pre.items():
        write_metric(root, "pretrained", metric, models)
    write_metric(root, "finetuned", "hessian", hessian)
    write_metric(root, "finetuned", "shape_bias", shape)
    for run, (init, top1) in finetunes.items():  # finetune.py's result.json
        done = 90 if run == "ft_scratch" else 180  # ft_scratch: stopped half way by --stop_iter
        write_json(os.path.join(root, run, "result.json"),
                   dict(top1=top1, top5=100.0, best_top1=top1, iter_num=done, max_iters=180,
                        config=dict(init=init, lr=1e-3, epochs=10, freeze_blocks=0)))
        write_json(os.path.join(root, run, "sharpness.json"), [])  # a list, not a metric
    os.makedirs(os.path.join(root, "steps"))
    with open(os.path.join(root, "steps", "md_x.done"), "w") as f:
        f.write("90\tpython train_md.py config/md_embedded.py\n")


def claim_lines(markdown):
    """{(claim title, teacher): (numbers, verdict)} from the report's verdict lines"""
    found, title = {}, None
    for line in markdown.splitlines():
        if line.startswith("### "):
            title = line[4:].split(":")[0]
        match = re.fullmatch(r"- (\w+): (.*): \*\*(holds|does not hold|not tested)\*\*", line)
        if match and title:
            found[(title, match.group(1))] = (match.group(2), match.group(3))
    return found


CLAIM_TITLES = ("attention distance", "head diversity", "NMI", "Fourier", "token spectrum",
                "flatness", "shape bias", "better baseline")


def test_better_baseline_of_a_run_stopped_early_is_not_judged(tmp_path):
    """finetune.py --summarize leaves runs stopped by --stop_iter out of its figures; the report
    does not judge the better baseline on one either (before: paper.sh smoke's runs, stopped at
    iteration 2 of 750, gave 'does not hold' on a tie)"""
    root = str(tmp_path / "run")
    make_run(root, ("clip",), True)
    path = os.path.join(root, "ft_clip_fd_lr", "result.json")
    result = json.load(open(path))
    write_json(path, result | dict(iter_num=2))
    analyze.main(["--metric", "report", root])
    lines = claim_lines(open(os.path.join(root, "report.md")).read())
    assert lines[("better baseline", "clip")] == (
        "ft_clip (lr 0.001) 97.00%, ft_clip_fd_lr (lr 0.001) 80.00% (stopped at iteration 2 of "
        "180): a run stopped before the end of its schedule is not judged", "not tested")


@pytest.mark.parametrize("holds, teachers", [(True, ("clip", "dino")), (False, ("embedded",))])
def test_every_claim_holds_or_fails_as_built(tmp_path, holds, teachers):
    root = str(tmp_path / "run")
    make_run(root, teachers, holds)
    analyze.main(["--metric", "report", root])
    markdown = open(os.path.join(root, "report.md")).read()
    lines = claim_lines(markdown)
    expected = "holds" if holds else "does not hold"
    for title in CLAIM_TITLES:
        # the better baseline is tested on CLIP, or on the first teacher standing in for it
        subjects = teachers[:1] if title == "better baseline" else teachers
        for t in subjects:
            assert lines[(title, t)][1] == expected, (title, t, lines[(title, t)])
    assert len(lines) == 7 * len(teachers) + 1
    t = teachers[0]
    # the numbers shown are the ones the rule compares (means over blocks 5-6)
    assert lines[("attention distance", t)][0] == (
        f"teacher {t} 10 px, MD student md_{t} {8 if holds else 12} px")
    student = -0.5 if holds else -3
    assert lines[("token spectrum", t)][0] == f"teacher {t} -2, MD student md_{t} {student}"
    assert ("stand-in: " in lines[("better baseline", t)][0]) == (t != "clip")
    assert lines[("better baseline", t)][0].startswith(f"ft_{t} (lr 0.001) 97.00%, ft_{t}_fd_lr (lr 0.001) "
                                                       f"{80 if holds else 99}.00%")
    tests = 7 * len(teachers) + 1
    assert f"{tests if holds else 0} of {tests} tests hold" in markdown
    # every figure, the fine-tuning table, the step record
    for metric in ("attn_distance", "nmi", "svd", "hessian", "shape_bias"):
        assert re.search(rf"!\[{metric}\]\(analysis/\w+/{metric}\.png\)", markdown), metric
    # captions: the images each figure rests on (shape bias: the cue-conflict images decided on)
    assert re.search(r"\*nmi \(Fig\. 6a\): [\w, ]+, 16 images of embedded\*", markdown)
    assert "cue-conflict images of embedded*" in markdown and ", 10 cue-conflict images" in markdown
    top1 = 83 if holds else 99
    assert f"| ft_md_{t} | out/md_{t}/ckpt.pt | 0.001 | 10 | {top1}.00% |" in markdown
    assert "| ft_scratch | scratch | 0.001 | 10 (stopped at iteration 90 of 180) | 60.00% |" in markdown
    assert "1 step(s), 1.5 minutes in all" in markdown
    # the HTML page says the same
    page = open(os.path.join(root, "report.html")).read()
    assert page.count(f"<b>{expected}</b>") == len(lines)
    assert page.count("<img ") == markdown.count("![")


def test_missing_results_are_not_tested(tmp_path):
    root = str(tmp_path / "run")
    write_metric(root, "pretrained", "nmi", dict(clip=per_layer_entry(layers(0.2, 0.05)),
                                                 md_clip=per_layer_entry(layers(0.1, 0.1))))
    # a results file in another format: no trace in the Hessian entries
    write_metric(root, "finetuned", "hessian", dict(ft_clip=dict(eigenvalues=[1.0]),
                                                    ft_md_clip=dict(eigenvalues=[2.0])))
    analyze.main(["--metric", "report", root])
    lines = claim_lines(open(os.path.join(root, "report.md")).read())
    assert lines[("NMI", "clip")][1] == "holds"
    assert {v for k, (_, v) in lines.items() if k[0] != "NMI"} == {"not tested"}
    assert lines[("flatness", "clip")][0] == "the results lack 'trace'"
    reason = "no shape_bias results for ft_clip and ft_md_clip under the run"
    assert lines[("shape bias", "clip")][0] == reason


def test_results_edited_by_hand_are_not_tested_instead_of_a_traceback(tmp_path, capsys):
    """fields of another type or empty (before: ValueError, AttributeError or TypeError tracebacks,
    or a verdict on NaN): the claims that read them are not tested, the files that are not
    analyze.py's or finetune.py's layout (or not text) are skipped with a warning, the other
    claims keep their verdicts"""
    root = str(tmp_path / "run")
    make_run(root, ("clip",), holds=True)
    def edit(relative, change):
        path = os.path.join(root, relative)
        data = json.load(open(path))
        change(data)
        write_json(path, data)
    edit("analysis/finetuned/hessian.json",
         lambda d: d["models"]["ft_md_clip"].update(eigenvalues=[]))
    edit("analysis/finetuned/shape_bias.json",
         lambda d: d["models"]["ft_md_clip"].update(shape_bias="0.3"))
    edit("analysis/pretrained/nmi.json", lambda d: d["models"]["md_clip"].update(per_layer=[]))
    edit("analysis/pretrained/fourier.json", lambda d: d["models"].update(md_clip=7))
    edit("ft_clip_fd_lr/result.json", lambda d: d.update(top1=None))
    damaged = os.path.join(root, "steps", "ft_x.done")  # not UTF-8 (before: UnicodeDecodeError)
    with open(damaged, "wb") as f:
        f.write(b"12\t\xff\xfe python finetune.py\n")
    analyze.main(["--metric", "report", root])
    warnings = capsys.readouterr().err
    assert f"warning: skipping unreadable {damaged} ('utf-8' codec can't decode" in warnings
    assert "1 step(s), 1.5 minutes in all" in open(os.path.join(root, "report.md")).read()
    assert (f"warning: skipping {os.path.join(root, 'analysis/pretrained/fourier.json')}: "
            "its models" in warnings)
    assert (f"warning: skipping {os.path.join(root, 'ft_clip_fd_lr/result.json')}: its top1"
            in warnings)
    lines = claim_lines(open(os.path.join(root, "report.md")).read())
    assert lines[("flatness", "clip")] == ("the results cannot be read (ValueError: max() arg "
                                           "is an empty "
                                           "sequence)", "not tested")
    assert (lines[("shape bias", "clip")][1] == "not tested"
            and "ValueError" in lines[("shape bias", "clip")][0])
    assert lines[("NMI", "clip")] == ("the results cannot be read (ValueError: no blocks in "
                                      "per_layer)",
                                      "not tested")
    assert (lines[("Fourier", "clip")][1] == "not tested"
            and lines[("better baseline", "clip")][1] == "not tested")
    assert lines[("attention distance", "clip")][1] == "holds"


def test_a_label_in_two_files_of_one_metric_is_said(tmp_path, capsys):
    """md_clip's nmi in two folders of the run (before: the last file walked won without a word):
    a warning names both files and the one used, the later one read, whose numbers the claim shows"""
    root = str(tmp_path / "run")
    write_metric(root, "a", "nmi", dict(clip=per_layer_entry(layers(0.2, 0.05)),
                                        md_clip=per_layer_entry(layers(0.1, 0.1))))
    write_metric(root, "b", "nmi", dict(md_clip=per_layer_entry(layers(0.3, 0.02))))
    analyze.main(["--metric", "report", root])
    first, second = (os.path.join(root, "analysis", g, "nmi.json") for g in ("a", "b"))
    assert capsys.readouterr().err == (f"warning: md_clip has nmi results in {first} and {second}: "
                                       f"the report uses the later one read, {second}\n")
    lines = claim_lines(open(os.path.join(root, "report.md")).read())
    assert lines[("NMI", "clip")] == ("teacher clip 0.05, MD student md_clip 0.02", "does not hold")


def test_intro_and_fine_tuning_table_take_fields_edited_by_hand(tmp_path):
    """an attention-distance entry without per_layer, one whose per_layer is a number, a fine-tune
    whose lr is text (before: KeyError, TypeError and ValueError tracebacks): the depth comes from
    the entries that have a list, the lr is shown as written"""
    root = str(tmp_path / "run")
    make_run(root, ("clip", "dino"), holds=True)
    path = os.path.join(root, "analysis", "pretrained", "attn_distance.json")
    data = json.load(open(path))
    del data["models"]["clip"]["per_layer"]
    data["models"]["md_clip"]["per_layer"] = 7
    write_json(path, data)
    path = os.path.join(root, "ft_md_clip", "result.json")
    data = json.load(open(path))
    data["config"]["lr"] = "1e-3"
    write_json(path, data)
    analyze.main(["--metric", "report", root])
    markdown = open(os.path.join(root, "report.md")).read()
    assert "High layers = the last third of the blocks (blocks 5-6 of 6)." in markdown
    assert "| ft_md_clip | out/md_clip/ckpt.pt | 1e-3 | 10 | 83.00% |" in markdown
    assert "| ft_md_dino | out/md_dino/ckpt.pt | 0.001 | 10 | 83.00% |" in markdown


def test_captions_count_the_images_each_model_read(tmp_path):
    """a caption gives the images the entries say were read (n_images is what was asked for); a file
    written before entries said it, its n_images"""
    root = str(tmp_path / "run")
    write_metric(root, "few", "nmi", dict(clip=per_layer_entry(layers(0.2, 0.05)) | dict(images=8),
                                          md_clip=per_layer_entry(layers(0.1, 0.1)) | dict(images=6)))
    write_metric(root, "older", "attn_distance", dict(clip=per_layer_entry(layers(10.0, 10.0))))
    analyze.main(["--metric", "report", root])
    markdown = open(os.path.join(root, "report.md")).read()
    assert "*nmi (Fig. 6a): clip, md_clip, 6 or 8 images of embedded*" in markdown
    assert "*attn_distance (Fig. 3a): clip, 16 images of embedded*" in markdown


def test_the_sharpness_figure_is_in_the_report(tmp_path, capsys):
    """analyze.py --metric sharpness writes each model's finetune.py log (a list) as its entry: the
    report shows its figure (before: skipped with "its models are not analyze.py's {label: entry}")"""
    root = tmp_path / "run"
    log = tmp_path / "ft_md_clip" / "sharpness.json"  # finetune.py --hessian_every's records
    write_json(str(log), [dict(iter=i, eigenvalue=10.0 + i, trace=100.0 + i, trace_stderr=1.0,
                               parameters=1000) for i in (2, 4)])
    analyze.main(["--metric", "sharpness", str(log), "--labels=ft_md_clip",
                  f"--out={root / 'analysis' / 'finetuned'}"])
    capsys.readouterr()
    analyze.main(["--metric", "report", str(root)])
    assert "skipping" not in capsys.readouterr().err
    markdown = open(root / "report.md").read()
    assert "(analysis/finetuned/sharpness.png)" in markdown
    assert "*sharpness (Fig. 7c/f): ft_md_clip*" in markdown


@pytest.mark.parametrize("make, message", [
    (lambda root: None, "no analyze.py or finetune.py results"),
    (lambda root: os.rmdir(root), "takes one run folder"),
])
def test_report_bad_input(tmp_path, make, message):
    root = str(tmp_path / "empty")
    os.makedirs(root)
    make(root)
    with pytest.raises(SystemExit, match=message):
        analyze.main(["--metric", "report", root])


def test_fine_tuned_models_alone_are_tested(tmp_path):
    """a run folder with only the fine-tuned models' analyses: the teacher is found from ft_md_T,
    the claims on fine-tuned models are tested, the ones on md_T are counted as not tested"""
    root = str(tmp_path / "run")
    write_metric(root, "finetuned", "hessian", dict(ft_clip=dict(eigenvalues=[100.0], trace=500.0),
                                                    ft_md_clip=dict(eigenvalues=[60.0], trace=300.0)))
    write_metric(root, "finetuned", "shape_bias", dict(ft_clip=dict(shape_bias=0.2),
                                                       ft_md_clip=dict(shape_bias=0.1)))
    analyze.main(["--metric", "report", root])
    markdown = open(os.path.join(root, "report.md")).read()
    lines = claim_lines(markdown)
    assert lines[("flatness", "clip")][1] == "holds"
    assert lines[("shape bias", "clip")][1] == "does not hold"
    assert "1 of 8 tests hold, 1 do not, 6 not tested." in markdown  # 5 on md_clip, the baseline
    assert lines[("NMI", "clip")][0] == "no nmi results for clip and md_clip under the run"


def test_no_student_no_claim(tmp_path, capsys):
    """models that are neither md_T nor ft_md_T: no claim can be tested, and the report says why
    instead of '0 of 0 tests hold'"""
    root = str(tmp_path / "run")
    write_metric(root, "pretrained", "nmi", dict(a=per_layer_entry(layers(0.2, 0.05)),
                                                 b=per_layer_entry(layers(0.1, 0.1))))
    analyze.main(["--metric", "report", root])
    markdown = open(os.path.join(root, "report.md")).read()
    assert "No claim tested" in markdown and "tests hold" not in markdown
    assert claim_lines(markdown) == {}
    assert "no claim tested" in capsys.readouterr().out


def test_a_result_json_without_its_iteration_counts_is_skipped_with_a_warning(tmp_path, capsys):
    """a fine-tune's result.json whose iter_num is missing or whose max_iters is text (edited by hand,
    or another program's file): skipped with a warning, the rest of the report is written (before: a
    KeyError traceback from the fine-tuning table)"""
    root = str(tmp_path / "run")
    make_run(root, ("clip",), holds=True)
    for run, edit in (("ft_md_clip", lambda d: d.pop("iter_num")),
                      ("ft_clip", lambda d: d.update(max_iters="90"))):
        path = os.path.join(root, run, "result.json")
        data = json.load(open(path))
        edit(data)
        write_json(path, data)
    analyze.main(["--metric", "report", root])
    err = capsys.readouterr().err
    for run in ("ft_md_clip", "ft_clip"):
        assert (f"warning: skipping {os.path.join(root, run, 'result.json')}: its top1, top5, "
                "best_top1, iter_num, max_iters or config is not finetune.py's") in err
    markdown = open(os.path.join(root, "report.md")).read()
    # the fine-tuning table's rows: run | init | lr | ...
    assert ("| ft_md_clip | out/md_clip/ckpt.pt |" not in markdown
            and "| ft_clip | clip |" not in markdown)
    assert "| ft_clip_fd_lr | clip |" in markdown


def test_headline_table_shows_the_high_layers_head_spread_and_top_eigenvalue():
    """headline_table on hand-built entries, each number worked out by hand: 5 blocks, whose
    last third is round(5 / 3) = 2 blocks; the attention distance is 20 in blocks 1-3 and 8 in
    blocks 4-5 (headline 8, not the low layers' 20); the entropy spread is the population
    standard deviation over the heads, sqrt(((1-3)^2 + 0 + (5-3)^2) / 3) = sqrt(8/3) = 1.633
    (the variance would be 2.667); λ1 is the eigenvalue of largest magnitude, -100 here, though
    the list gives 50 first"""
    metrics = dict(
        attn_distance={"md_x": per_layer_entry([20.0, 20.0, 20.0, 8.0, 8.0])},
        attn_entropy={"md_x": dict(per_layer=[3.0] * 5, per_head=[[3.0, 3.0, 3.0]] * 3
                                   + [[1.0, 3.0, 5.0]] * 2)},
        hessian={"ft_md_x": dict(eigenvalues=[50.0, -100.0], trace=400.0)})
    header, rows = analyze.headline_table(metrics, {})
    table = {row[0]: dict(zip(header, row)) for row in rows}
    assert table["md_x"]["attention distance (px)"] == "8"
    assert table["md_x"]["entropy spread over heads"] == f"{math.sqrt(8 / 3):.4g}" == "1.633"
    assert table["ft_md_x"]["Hessian λ1"] == "-100"
    assert table["ft_md_x"]["Hessian trace"] == "400"


@pytest.mark.parametrize("values, last, expected", [
    ([1, 2, 3, 4, 5, 6, 7, 8], True, 7.0),  # round(8 / 3) = 3 blocks: (6 + 7 + 8) / 3
    ([1, 2, 3, 4, 5, 6, 7, 8], False, 2.0),  # the first 3: (1 + 2 + 3) / 3
    ([1, 2, 3, 4, 5], True, 4.5),  # round(5 / 3) = 2 blocks: (4 + 5) / 2
    ([1, 2], True, 2.0),  # round(2 / 3) = 1: at least one block
])
def test_third_is_the_rounded_third_of_the_blocks(values, last, expected):
    """the 'high' ('low') layers of every rule: the last (first) round(depth / 3) blocks, at
    least one, as the docstring says; means worked out by hand"""
    assert analyze.third(values, last) == pytest.approx(expected)


@pytest.mark.parametrize("md_trace, md_eigenvalue, verdict", [
    (91.0, 60.0, "not tested"),       # |100| - |91| = 9 <= 2 sqrt(3^2 + 4^2) = 10: the traces decide nothing
    (89.0, 60.0, "holds"),            # 11 > 10, and 60 < 100
    (-89.0, 60.0, "holds"),           # magnitudes compared
    (109.0, 60.0, "not tested"),      # the other way, still within 10
    (111.0, 60.0, "does not hold"),   # the md fine-tune's trace larger by more than 10
    (91.0, -120.0, "does not hold"),  # |λ1| larger: refuted whatever the traces
])
def test_flatness_needs_the_traces_apart_by_more_than_their_errors(tmp_path, md_trace, md_eigenvalue, verdict):
    """before: 84 +- 140 against 42 +- 70 was judged; now a trace gap within 2 combined standard errors
    leaves the claim not tested, with the reason, unless the top eigenvalue alone refutes it"""
    root = str(tmp_path / "run")
    write_metric(root, "finetuned", "hessian", dict(
        ft_clip=dict(eigenvalues=[100.0], trace=100.0, trace_stderr=3.0),
        ft_md_clip=dict(eigenvalues=[md_eigenvalue], trace=md_trace, trace_stderr=4.0)))
    analyze.main(["--metric", "report", root])
    numbers, result = claim_lines(open(os.path.join(root, "report.md")).read())[("flatness", "clip")]
    assert result == verdict
    if verdict == "not tested":
        assert f"the traces differ by {abs(100 - abs(md_trace)):.2g}, within 2 standard errors (10)" in numbers
