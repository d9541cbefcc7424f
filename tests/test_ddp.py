"""Two data-parallel processes (gloo on the CPU, torch.multiprocessing, no Ray) against one.

What runs here is what a 2-GPU Ray Train job runs: DDP, ``no_sync`` accumulation, the sampler's
rank shards, buffer averaging before validation, the gathered validation scores, the barrier
around checkpoints. One process with ``accum_steps=2`` sees the same micro-batches as two
processes with ``accum_steps=1`` (rank r takes the epoch's positions r, r+2, ...; one process
takes them in pairs), so their weights after the same optimizer steps must agree.

Images are mirror-symmetric so the light pipeline's random flip changes nothing, dropout and MixUp
are off, and micro-batches hold one image (so BatchNorm's batch statistics are the same grouping
in both runs): what is left to differ is the order of floating-point sums in the all-reduce.

The two processes train once more with ``runtime.compile=true`` (DDP around the compiled model), to
the eager run's weights. Two that resume from different checkpoints both go on from rank 0's, to
the weights of the run without a resume, and a NaN on one rank is a NaN on both in the loss the
divergence check reads.
"""

from __future__ import annotations

import math
import shutil
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

from trueface.checkpoint import load_checkpoint
from trueface.config import load_config
from trueface.data.layout import discover_layout
from trueface.distributed import DistInfo, mean_over_ranks
from trueface.evaluation import load_models
from trueface.inference import predict_scores
from trueface.metrics import roc_auc
from trueface.model import build_model
from trueface.precision import Runtime

pytestmark = pytest.mark.timeout(600)
WORLD = 2
STEPS_PER_EPOCH = 4
EPOCHS = 2
# fp32, the same micro-batches. Measured here: bit-identical ((g0 + g1) / 2 == g0 / 2 + g1 / 2 in
# binary floating point); the tolerance leaves room for BLAS or all-reduce orders elsewhere.
ATOL, RTOL = 2e-5, 1e-4


def _symmetric_root(root: Path) -> Path:
    rng = np.random.default_rng(3)
    for split, n in (("train", 6), ("valid", 5), ("test", 1)):
        for label, name in ((0, "real"), (1, "fake")):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                half = rng.integers(40, 200, (64, 32, 3), dtype=np.uint8)
                if label:
                    half[28:36] = 250  # a horizontal band: symmetric, learnable
                Image.fromarray(np.concatenate([half, half[:, ::-1]], axis=1)).save(folder / f"{split}_{i}.png")
    return root


def _config(root: Path, out: Path, accum_steps: int, compiling: bool = False):
    return load_config("demo", [f"runtime.compile={str(compiling).lower()}",
        f"data.root={root}", f"output.runs_dir={out}", "run_name=ddp", "data.loader_workers=0",
        "model.weights=none", "model.dropout=0.0", "runtime.precision=fp32", "runtime.log_every=1", "eval.batch_size=1",
        "stage1.image_size=64", f"stage1.epochs={EPOCHS}", "stage1.batch_size=2", f"stage1.accum_steps={accum_steps}",
        f"stage1.samples_per_epoch={2 * STEPS_PER_EPOCH}", "stage1.balance=none", "stage1.light_epochs=99",
        "stage1.mixup_alpha=0.0", "stage1.patience=0", "stage1.warmup_epochs=0.5", "stage1.lr=0.001",
        "stage1.ema_decay=0.9",
    ])


def _samples(cfg, split: str):
    layout = discover_layout(cfg.data.root)
    return layout.gather(layout.domains, split)


def _join(rank: int, rendezvous: str, timeout: timedelta = timedelta(minutes=30)) -> None:
    """This process as rank ``rank`` of WORLD gloo processes, on one thread (two share the cores)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=WORLD, timeout=timeout)


def _worker(rank: int, root: str, out: str, rendezvous: str, compile_backend: str | None = None) -> None:
    """One rank: train Stage I, recording what validation sees; then score 7 samples with 2 ranks.
    ``compile_backend``: train with runtime.compile=true, torch.compile using that backend."""
    _join(rank, rendezvous)
    import trueface.train as train

    seen, reports, graphs = [], [], []
    if compile_backend:
        from torch._dynamo import lookup_backend
        from torch._guards import CompileContext

        real_compile = torch.compile

        def counting(gm, example_inputs):  # records each graph dynamo hands the backend, then compiles it
            graphs.append((str(CompileContext.current_compile_id()), len(gm.graph.nodes)))
            return lookup_backend(compile_backend)(gm, example_inputs)

        torch.compile = lambda model, **kw: real_compile(model, backend=counting, **kw)
    _record_validation(train, seen)
    cfg = _config(Path(root), Path(out), accum_steps=1, compiling=compile_backend is not None)
    di = DistInfo(rank, WORLD)

    def report(metrics: dict, path: Path | None) -> None:
        reports.append(metrics)
        if path is not None and metrics["epoch"] == 1:  # rank 0's last.pt after epoch 1: a point to resume from
            shutil.copy(path, Path(out) / "epoch1.pt")

    train.run_stage(cfg, 1, _samples(cfg, "train"), _samples(cfg, "valid"), Path(out) / "ddp" / "stage1",
                    dist_info=di, report=report, log_dir=Path(out) / "tb")
    # predict_scores over 2 ranks with a sample count that does not divide by 2
    model = load_models(load_checkpoint(Path(out) / "ddp" / "stage1" / "best.pt"), cfg)["ema"]
    scores = predict_scores(model, _samples(cfg, "valid")[:7], 64, Runtime.create("cpu", "fp32"), cfg, di)
    torch.save({"seen": seen, "reports": reports, "scores": scores, "graphs": graphs}, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


def _record_validation(train, seen: list) -> None:
    """Makes ``train.validate`` append the state dicts of the models it validates to ``seen``."""
    real_validate = train.validate

    def recording_validate(models, *args, **kwargs):
        seen.append({name: {k: v.detach().clone() for k, v in m.state_dict().items()} for name, m in models.items()})
        return real_validate(models, *args, **kwargs)

    train.validate = recording_validate


@pytest.fixture(scope="module")
def runs(module_tmp):
    """The 2-process run and the 1-process accum_steps=2 run, trained once for every test here."""
    tmp = module_tmp
    root = _symmetric_root(tmp / "data")
    mp.spawn(_worker, args=(str(root), str(tmp / "two"), str(tmp / "rendezvous")), nprocs=WORLD, join=True)
    import trueface.train as train

    one_cfg = _config(root, tmp / "one", accum_steps=2)
    torch.set_num_threads(1)
    one = train.run_stage(one_cfg, 1, _samples(one_cfg, "train"), _samples(one_cfg, "valid"), tmp / "one" / "ddp" / "stage1",
                          log_dir=tmp / "one" / "tb")
    ranks = [torch.load(tmp / "two" / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    return {"tmp": tmp, "cfg": one_cfg, "ranks": ranks, "one": one}


def test_two_processes_train_the_same_weights_as_one_with_accumulation(runs):
    two = load_checkpoint(runs["tmp"] / "two" / "ddp" / "stage1" / "last.pt")
    one = load_checkpoint(runs["tmp"] / "one" / "ddp" / "stage1" / "last.pt")
    assert two["step"] == one["step"] == EPOCHS * STEPS_PER_EPOCH
    init = build_model(runs["cfg"].model)  # the seed's initial weights, which both runs started from
    worst = 0.0
    for key in ("model", "ema"):
        for name, start in init.named_parameters():
            a, b = two[key][name], one[key][name]
            worst = max(worst, (a - b).abs().max().item())
            torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL, msg=lambda m: f"{key}.{name}: {m}")
    print(f"largest |2 processes - 1 process| over all weights: {worst:.2e}")
    # the weights moved: a run that did not train would pass the comparison trivially
    assert not torch.allclose(two["model"]["fc.1.weight"], init.state_dict()["fc.1.weight"])


def test_the_logged_step_loss_is_the_global_batchs_as_on_one_process(runs):
    # every rank's micro-batches, as the epoch's loss: rank 0's alone was half of each global batch
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def step_losses(folder: Path) -> list[tuple[int, float]]:
        events = EventAccumulator(str(folder))
        events.Reload()
        return [(e.step, e.value) for e in events.Scalars("train/loss")]

    two, one = step_losses(runs["tmp"] / "two" / "tb"), step_losses(runs["tmp"] / "one" / "tb")
    assert [s for s, _ in two] == [s for s, _ in one] == list(range(1, EPOCHS * STEPS_PER_EPOCH + 1))
    np.testing.assert_allclose([v for _, v in two], [v for _, v in one], rtol=RTOL, atol=ATOL)


def test_both_ranks_validate_identical_ema_and_raw_models_buffers_included(runs):
    seen0, seen1 = runs["ranks"][0]["seen"], runs["ranks"][1]["seen"]
    assert len(seen0) == len(seen1) == EPOCHS
    for epoch, (a, b) in enumerate(zip(seen0, seen1), start=1):
        for weights in ("raw", "ema"):
            differing = [k for k in a[weights] if not torch.equal(a[weights][k], b[weights][k])]
            assert not differing, f"epoch {epoch}: rank 0 and rank 1 validate different {weights} models: {differing[:4]}"
    # buffers really were updated by training (identical only because they were averaged)
    assert not torch.equal(seen0[-1]["ema"]["bn1.running_mean"], torch.zeros_like(seen0[-1]["ema"]["bn1.running_mean"]))


def test_reported_validation_auc_is_the_saved_best_checkpoints(runs):
    """best.pt (written by rank 0) scored alone gives exactly the AUC both ranks reported for it."""
    reports = runs["ranks"][0]["reports"]
    best = load_checkpoint(runs["tmp"] / "two" / "ddp" / "stage1" / "best.pt")
    reported = next(m for m in reports if m["epoch"] == best["best_epoch"])
    cfg = runs["cfg"]
    samples = _samples(cfg, "valid")
    labels = np.array([s.label for s in samples])
    scores = predict_scores(load_models(best, cfg)["ema"], samples, 64, Runtime.create("cpu", "fp32"), cfg)
    assert roc_auc(labels, scores) == reported["val/auc_ema"]
    assert runs["ranks"][1]["reports"][best["best_epoch"] - 1]["val/auc_ema"] == reported["val/auc_ema"]


def test_predict_scores_over_two_ranks_equals_one_rank_in_order(runs):
    cfg = runs["cfg"]
    samples = _samples(cfg, "valid")[:7]  # 7 over 2 ranks: 4 + 3
    best = load_checkpoint(runs["tmp"] / "two" / "ddp" / "stage1" / "best.pt")
    single = predict_scores(load_models(best, cfg)["ema"], samples, 64, Runtime.create("cpu", "fp32"), cfg)
    for rank in range(WORLD):
        two = runs["ranks"][rank]["scores"]
        assert two.shape == (7,) and np.array_equal(two, single), f"rank {rank}: {two} != {single}"
    assert len(set(single.tolist())) > 1  # distinct scores, so an order mix-up would show


@pytest.fixture(scope="module")
def compiled(runs):
    """The 2-process run again with runtime.compile=true: DDP around the compiled model, as a
    multi-GPU job that compiles runs it. The backend is aot_eager: dynamo's graph and AOTAutograd's
    forward and backward, as inductor receives them, run without inductor's C++ build (minutes here)."""
    tmp = runs["tmp"]
    mp.spawn(_worker, args=(str(tmp / "data"), str(tmp / "compiled"), str(tmp / "rendezvous-compiled"), "aot_eager"),
             nprocs=WORLD, join=True)
    return [torch.load(tmp / "compiled" / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def test_ddp_around_the_compiled_model_trains_the_weights_the_eager_one_does(runs, compiled):
    # Each rank compiled the training forward once, without a graph break: no recompiling when
    # validation switches the same module to eval and back, or in the second epoch. Dynamo sees
    # it runs inside DDP's forward and splits the graph at DDP's gradient buckets (its
    # DDPOptimizer), so that a GPU job's all-reduce of one bucket overlaps the backward of the next.
    # (Compile ids are "frame/compile": "0/1" would be a recompile, "1/0" the code after a break.)
    for rank in compiled:
        assert len(rank["graphs"]) > 1 and {compile_id for compile_id, _ in rank["graphs"]} == {"0/0"}, rank["graphs"]
    print(f"graphs rank 0 compiled (compile id, nodes): {compiled[0]['graphs']}")
    eager = load_checkpoint(runs["tmp"] / "two" / "ddp" / "stage1" / "last.pt")
    done = load_checkpoint(runs["tmp"] / "compiled" / "ddp" / "stage1" / "last.pt")
    assert done["step"] == eager["step"] and done["model"].keys() == eager["model"].keys()  # no _orig_mod. prefixes
    worst = 0.0
    for key in ("model", "ema"):
        for name, weight in eager[key].items():
            worst = max(worst, (done[key][name].double() - weight.double()).abs().max().item())
            torch.testing.assert_close(done[key][name], weight, atol=ATOL, rtol=RTOL, msg=lambda m: f"{key}.{name}: {m}")
    print(f"largest |compiled - eager| over all weights and buffers: {worst:.2e}")
    seen0, seen1 = compiled[0]["seen"], compiled[1]["seen"]  # gradients and buffers still agree between ranks
    assert len(seen0) == len(seen1) == EPOCHS
    for a, b in zip(seen0, seen1):
        assert all(torch.equal(a[w][k], b[w][k]) for w in ("raw", "ema") for k in a[w])


def _mean_worker(rank: int, rendezvous: str, out: str) -> None:
    _join(rank, rendezvous)
    di = DistInfo(rank, WORLD)
    finite = mean_over_ranks(torch.tensor(1.0 + 2 * rank), di)  # 1 and 3
    one_diverged = mean_over_ranks(torch.tensor(float("nan") if rank == 1 else 0.5), di)
    torch.save({"finite": finite.item(), "diverged": one_diverged.item()}, Path(out) / f"mean{rank}.pt")
    dist.destroy_process_group()


def test_the_mean_over_ranks_is_the_same_on_every_rank_a_non_finite_one_included(tmp_path):
    # train_one_epoch decides divergence on it: rank 1's NaN must stop rank 0 too (tests/test_engine.py)
    mp.spawn(_mean_worker, args=(str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=WORLD, join=True)
    seen = [torch.load(tmp_path / f"mean{r}.pt") for r in range(WORLD)]
    assert [s["finite"] for s in seen] == [2.0, 2.0]
    assert all(math.isnan(s["diverged"]) for s in seen)
    one = torch.tensor(0.25)
    assert mean_over_ranks(one, DistInfo()) is one  # one process: no collective, no copy


def _resume_worker(rank: int, root: str, out: str, rendezvous: str, checkpoints: list[str]) -> None:
    """Rank r resumes from ``checkpoints[r]``, as nodes whose copies of last.pt differ would."""
    # ranks that went on from different epochs would wait at mismatched collectives: fail in a
    # minute, not 30
    _join(rank, rendezvous, timeout=timedelta(seconds=60))
    import trueface.train as train

    seen, reports = [], []
    _record_validation(train, seen)
    cfg = _config(Path(root), Path(out), accum_steps=1)
    train.run_stage(cfg, 1, _samples(cfg, "train"), _samples(cfg, "valid"), Path(out) / f"rank{rank}" / "stage1",
                    dist_info=DistInfo(rank, WORLD), report=lambda metrics, path: reports.append(metrics),
                    resume_from=Path(checkpoints[rank]) if checkpoints[rank] else None)
    Path(out).mkdir(parents=True, exist_ok=True)
    torch.save({"seen": seen, "reports": reports}, Path(out) / f"resumed{rank}.pt")
    dist.destroy_process_group()


def test_ranks_that_resume_from_different_checkpoints_all_go_on_from_rank_0s(runs, capfd):
    # Rank 0 finds the two-process run's last.pt after epoch 1; rank 1 a newer one, after epoch 2
    # (as a node whose upload a crash cut off). Both go on from rank 0's: they train epoch 2 again,
    # to the weights the run reached without a resume.
    tmp = runs["tmp"]
    first, last = tmp / "two" / "epoch1.pt", tmp / "two" / "ddp" / "stage1" / "last.pt"
    mp.spawn(_resume_worker, args=(str(tmp / "data"), str(tmp / "resume"), str(tmp / "rendezvous-resume"),
                                   [str(first), str(last)]), nprocs=WORLD, join=True)
    assert (f"stage1: the workers resumed from different checkpoints (rank 0 at epoch 1, step {STEPS_PER_EPOCH}, "
            f"from {first}; rank 1 at epoch {EPOCHS}, step {EPOCHS * STEPS_PER_EPOCH}, from {last}): every rank goes "
            f"on from rank 0's, at epoch 1, step {STEPS_PER_EPOCH}.") in capfd.readouterr().out
    resumed = [torch.load(tmp / "resume" / f"resumed{r}.pt", weights_only=False) for r in range(WORLD)]
    for rank in resumed:  # each trained epoch 2 alone, to the step the uninterrupted run ended at, after
        # sending epoch 1's report again (a kill may have lost it): the same reports on every rank
        assert [(m["epoch"], m["step"]) for m in rank["reports"]] == [(1, STEPS_PER_EPOCH),
                                                                      (EPOCHS, EPOCHS * STEPS_PER_EPOCH)]
    # rank 1 validated the model rank 0 did, and that is the uninterrupted run's epoch 2
    uninterrupted = runs["ranks"][1]["seen"][-1]
    for weights in ("raw", "ema"):
        for key, value in uninterrupted[weights].items():
            for rank in resumed:
                torch.testing.assert_close(rank["seen"][-1][weights][key], value, atol=ATOL, rtol=RTOL,
                                           msg=lambda m: f"{weights}.{key}: {m}")
    saved = load_checkpoint(tmp / "resume" / "rank0" / "stage1" / "last.pt")
    assert saved["epoch"] == EPOCHS and [h["epoch"] for h in saved["history"]] == [1, 2]


def test_a_rank_without_a_checkpoint_makes_the_same_reports_as_rank_0(runs):
    # Rank 0 resumes after epoch 1, rank 1 finds no checkpoint (a new node) and takes on rank 0's
    # state. Every rank must make the same reports (Ray Train's report is collective): epoch 1's
    # again, which rank 1 never trained, then epoch 2.
    tmp = runs["tmp"]
    mp.spawn(_resume_worker, args=(str(tmp / "data"), str(tmp / "resume-new-node"), str(tmp / "rendezvous-new-node"),
                                   [str(tmp / "two" / "epoch1.pt"), ""]), nprocs=WORLD, join=True)
    reports = [torch.load(tmp / "resume-new-node" / f"resumed{r}.pt", weights_only=False)["reports"] for r in range(WORLD)]
    for rank in reports:
        assert [(m["epoch"], m["step"]) for m in rank] == [(1, STEPS_PER_EPOCH), (EPOCHS, EPOCHS * STEPS_PER_EPOCH)]
    assert reports[0][0] == reports[1][0]  # epoch 1's, as rank 0's checkpoint recorded it
