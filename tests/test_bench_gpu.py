"""``python -m jobs.benchmark gpu`` on the CPU (--quick): the rows it writes come from the real
engine path (loader, batched augmentation, ``train_one_epoch``), and a CPU run sets no target.
No speed is asserted (the machine is shared); the helpers' arithmetic is tested on its own."""

from __future__ import annotations

import argparse
import json
import math
import re
import threading
from collections import Counter
from dataclasses import replace

import pytest
import torch

import trueface.train
from jobs import benchmark
from trueface.augment_device import APPLY_STEPS, DeviceAugment
from trueface.bench import gpu
from trueface.bench.report import Bench
from trueface.bench.trace_gpu import GpuTime, gpu_time, read_trace
from trueface.config import load_config

# The CLI run at CUDA sizes takes minutes: on a GPU machine run the benchmark itself instead.
cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU path")

ROWS = [f"{stage} {row}" for stage in ("Stage I", "Stage II")
        for row in ("training (engine)", "input path vs model alone", "loader alone", "augmentation alone",
                    "decode, batched decode_jpeg vs PIL on one core")]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One ``gpu --quick`` run through the CLI, counting the engine's steps and the batches the
    batched augmentation got (both run in this process; the decoding runs in the loader worker)."""
    out = tmp_path_factory.mktemp("results")
    seen = {"steps": 0, "augment": [], "trace_from": [], "trace_warmup": []}
    real_step, real_augment = trueface.train.train_step, DeviceAugment.__call__
    real_trace, real_trace_start = gpu.trace_stage, gpu.Tracer.start

    def trace(*a, **k):  # the engine steps the trace's warm-up runs before the profiler starts
        seen["trace_from"].append(seen["steps"])
        return real_trace(*a, **k)

    def trace_start(self):
        seen["trace_warmup"].append(seen["steps"] - seen["trace_from"][-1])
        real_trace_start(self)

    def step(*a, **k):
        seen["steps"] += 1
        return real_step(*a, **k)

    def augment(self, images, generator, strong=True):
        seen["augment"].append((images.dtype, tuple(images.shape), strong))
        return real_augment(self, images, generator, strong)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(trueface.train, "train_step", step)
        mp.setattr(DeviceAugment, "__call__", augment)
        mp.setattr(gpu, "trace_stage", trace)
        mp.setattr(gpu.Tracer, "start", trace_start)
        assert benchmark.main(["gpu", "--quick", "--trace", "--results-dir", str(out)]) == 0
    seen["out"] = out / "bench-gpu"
    return json.loads((out / "bench-gpu" / "bench.json").read_text()), seen


@cpu_only
def test_every_stage_has_its_rows_with_positive_figures(quick_run):
    payload, _ = quick_run
    rows = {r["what"]: r for r in payload["rows"]}
    assert list(rows) == ROWS  # no nvml row and no GPU memory row without CUDA
    for r in rows.values():
        assert r["unit"] == "img/s" and math.isfinite(r["project"]) and r["project"] > 0
    for stage in ("Stage I", "Stage II"):
        ratio = rows[f"{stage} input path vs model alone"]
        assert ratio["project"] == rows[f"{stage} training (engine)"]["project"]
        assert ratio["reference"] > 0 and ratio["ratio"] == pytest.approx(ratio["project"] / ratio["reference"])
        assert "nvml not available" in ratio["note"] and "stands in for GPU busy" in ratio["note"]
        for part in ("loader alone", "augmentation alone"):  # each part of the input path against the engine
            row = rows[f"{stage} {part}"]
            assert row["reference"] == rows[f"{stage} training (engine)"]["project"]
            assert row["ratio"] == pytest.approx(row["project"] / row["reference"])
        decode = rows[f"{stage} decode, batched decode_jpeg vs PIL on one core"]  # its own reference, not the engine
        assert decode["reference"] > 0 and decode["ratio"] == pytest.approx(decode["project"] / decode["reference"])
        floor = re.search(r"host floor: (\d+\.\d\d) ms a batch", rows[f"{stage} augmentation alone"]["note"])
        assert floor and float(floor.group(1)) > 0  # the same ops on 16-px images
        waits = re.search(r"the training loop waited (\d+\.\d\d) ms a batch for its next one \(input wait \d+% of "
                          r"the time\); the side preparing batches \(inline, in the training loop\) waited "
                          r"(\d+\.\d\d) ms a batch on the DataLoader and spent (\d+\.\d\d) ms", ratio["note"])
        waited, loader, prepare = map(float, waits.groups())
        assert prepare > 0 and waited >= loader + prepare - 0.02  # inline the loop does both (2 decimals each)
        steps = rows[f"{stage} augmentation alone"]["note"].split("ms a batch by step", 1)[1]
        timed = re.findall(r"(?:, |: )([a-zA-Z ]+) (\d+\.\d\d)", steps)
        assert [name for name, _ in timed] == ["draw", *APPLY_STEPS]  # every step, in the order it runs
        size = gpu.CPU_QUICK[1 if stage == "Stage I" else 2]
        traffic = re.search(r"memory traffic counted op by op: ([\d.e+-]+) GB a batch \(([\d.e+-]+) MB an image\) "
                            r"in (\d+) ops, ([\d,]+) GB/s", rows[f"{stage} augmentation alone"]["note"])
        per_batch, per_image, ops = float(traffic.group(1)) * 1e9, float(traffic.group(2)) * 1e6, int(traffic.group(3))
        assert per_batch >= size.batch * 3 * size.image**2 * (1 + 4)  # at least the uint8 read, the float written
        assert per_batch == pytest.approx(per_image * size.batch, rel=0.01) and ops > 50


@cpu_only
def test_a_cpu_run_sets_no_target_and_says_so(quick_run):
    payload, _ = quick_run
    assert all(r["target"] is None and r["met"] is None for r in payload["rows"])
    assert payload["context"]["note"] == gpu.CPU_NOTE
    assert all(r["note"].startswith(gpu.CPU_NOTE) for r in payload["rows"] if "training" in r["what"])
    assert all(gpu.CPU_NOTE in r["note"] for r in payload["rows"])


@cpu_only
def test_the_engine_rows_come_from_the_engine_with_its_loader_and_batched_augmentation(quick_run):
    _, seen = quick_run
    q = gpu.CPU_QUICK
    engine_steps = [q[s].warmup + q[s].timed for s in (1, 2)]
    traced = [z.warmup + z.timed for z in (gpu.trace_size(q[s], gpu.queued_batches(1, cuda=False)) for s in (1, 2))]
    # DeviceAugment ran once per engine step, on the loader's uint8 batches, in a strong epoch, then
    # on one of those batches alone (warm-up and timed calls, and one whose synchronisations a GPU
    # counts), then as many images of 16 px (the host floor: warm-up and timed calls), then once on
    # the full batch whose memory traffic is counted, then once per step of the traced engine
    # window (--trace)
    alone, floor = gpu.AUGMENT_WARMUP + gpu.AUGMENT_REPEATS + 1, gpu.AUGMENT_WARMUP + gpu.AUGMENT_REPEATS
    full = [(torch.uint8, (q[s].batch, 3, q[s].image, q[s].image), True) for s in (1, 2)]
    assert seen["augment"] == [
        call for s in (1, 2)
        for call in [full[s - 1]] * (engine_steps[s - 1] + alone)
        + [(torch.uint8, (q[s].batch, 3, gpu.HOST_FLOOR_PX, gpu.HOST_FLOOR_PX), True)] * floor
        + [full[s - 1]] + [full[s - 1]] * traced[s - 1]]
    # train_one_epoch's steps: the engine's, as many again for the model alone, and the traced ones
    assert seen["steps"] == 2 * sum(engine_steps) + sum(traced)


@cpu_only
def test_the_trace_holds_the_timed_engine_steps_only_with_their_named_ranges(quick_run):
    _, seen = quick_run
    for stage in (1, 2):
        steps = min(gpu.TRACE_STEPS, gpu.CPU_QUICK[stage].timed)
        events = read_trace(seen["out"] / f"trace-stage{stage}.json.gz")  # gzipped: gzip.open fails on plain JSON
        ranges = Counter(e["name"] for e in events if e.get("ph") == "X")
        # the warm-up step ran before the profiler started: only the timed steps are in the trace
        for name in ("trueface.augment", "trueface.train_step", "trueface.optimizer_step", "trueface.ema_update"):
            assert ranges[name] == steps, name
        assert ranges["aten::convolution_backward"] >= 53 * steps  # ResNet-50's convolutions, each step
        ops = (seen["out"] / f"trace-stage{stage}-ops.txt").read_text()
        assert "Self CPU" in ops and "aten::convolution_backward" in ops
        # no kernels on a CPU: no GPU time, so no "GPU busy (trace)" row (the rows test holds the list)
        assert gpu_time(events) is None


@cpu_only
def test_the_trace_warms_up_past_the_batches_the_loader_queued_ahead(quick_run, tmp_path):
    """The batches a fresh loader prepares while the first steps wait (cuDNN's search, compiling)
    serve the steps after at no wait: traced, those could never show the loader starving the GPU."""
    payload, seen = quick_run
    queued = gpu.queued_batches(payload["context"]["loader_workers"], cuda=False)
    assert queued == 2 and seen["trace_warmup"] == [max(gpu.TRACE_WARMUP, queued)] * 2
    # on CUDA every worker's prefetched batches and the augmentation thread's, beyond the timed
    # run's warm-up; the traced epoch is made long enough for them (Stage II --quick plans 65 steps)
    quick = gpu.CUDA_QUICK[2]
    size = gpu.trace_size(quick, gpu.queued_batches(31, cuda=True))
    assert (size.warmup, size.timed) == (65, gpu.TRACE_STEPS) and quick.warmup + quick.timed == 65
    cfg = gpu.bench_config(gpu.CUDA_QUICK, 31, tmp_path)
    assert gpu.epoch_for(cfg, 2, size).stage2.samples_per_epoch == (65 + gpu.TRACE_STEPS) * quick.batch
    assert gpu.epoch_for(cfg, 2, size).stage1 == cfg.stage1


@cpu_only
def test_a_trace_with_gpu_time_adds_its_row_beside_the_stages_rows(tmp_path, monkeypatch, capsys):
    """What a CUDA trace gives (``trueface.bench.trace_gpu``, tested on its own) becomes a row of
    its stage, without a target; Stage II fails here to keep the run short."""
    summary = GpuTime(window_ms=250.0, busy_ms=215.0, steps=5, by_stream={7: 190.0, 25: 45.0},
                      by_range={"trueface.augment": 40.0, "trueface.train_step": 170.0, "other": 5.0})
    traced = []
    monkeypatch.setattr(gpu, "trace_stage", lambda cfg, stage, *a: traced.append(stage) or summary)
    real_measure = gpu.measure_stage

    def measure(cfg, stage, *a, **k):
        if stage == 2:
            raise RuntimeError("out of time (simulated)")
        return real_measure(cfg, stage, *a, **k)

    monkeypatch.setattr(gpu, "measure_stage", measure)
    assert benchmark.main(["gpu", "--quick", "--trace", "--results-dir", str(tmp_path)]) == 1
    rows = json.loads((tmp_path / "bench-gpu" / "bench.json").read_text())["rows"]
    assert traced == [1] and [r["what"] for r in rows] == [*[r for r in ROWS if r.startswith("Stage I ")],
                                                           "Stage I GPU busy (trace)"]
    row = rows[-1]
    assert row["project"] == pytest.approx(86.0) and row["unit"] == "%" and row["target"] is None
    assert row["note"] == summary.describe() and "trueface.augment 8.00 ms" in row["note"]


def test_plan_sizes_applies_overrides_and_covers_the_prefetch_queue_on_cuda():
    args = argparse.Namespace(quick=False, images=None, batch_size=None, image_size=None)
    assert gpu.plan_sizes(args, cuda=False, workers=1) == gpu.CPU_FULL
    # 62 batches in the loader's queue and 3 with the augmentation thread: 650 timed steps at least
    cuda = gpu.plan_sizes(args, cuda=True, workers=31)
    assert [(z.image, z.jpeg, z.batch, z.timed) for z in cuda.values()] == [(224, 256, 200, 650), (1024, 1024, 12, 650)]
    assert gpu.queued_batches(31, cuda=False) == 62 and gpu.queued_batches(31, cuda=True) == 65
    assert gpu.plan_sizes(args, cuda=True, workers=3)[1].timed == gpu.CUDA_FULL[1].timed
    quick = argparse.Namespace(quick=True, images=None, batch_size=None, image_size=None)
    # quick stays quick, and so its timed window is too short to judge against the targets (see
    # test_the_targets_judge_only_full_runs_at_the_papers_sizes)
    assert gpu.plan_sizes(quick, cuda=True, workers=31) == gpu.CUDA_QUICK
    assert gpu.CUDA_QUICK[1].timed < gpu.PREFETCH_COVER * gpu.queued_batches(31, cuda=True)
    over = argparse.Namespace(quick=True, images=40, batch_size=8, image_size=112)
    sizes = gpu.plan_sizes(over, cuda=False, workers=1)
    assert (sizes[1].image, sizes[1].jpeg, sizes[1].batch, sizes[1].timed) == (112, 128, 8, 5)
    assert (sizes[2].image, sizes[2].batch, sizes[2].timed) == (gpu.CPU_QUICK[2].image, 8, 5)
    with pytest.raises(SystemExit, match="--batch-size >= 2"):
        gpu.plan_sizes(argparse.Namespace(quick=True, images=None, batch_size=1, image_size=None), False, 1)
    with pytest.raises(SystemExit, match="--image-size must be >= 32"):
        gpu.plan_sizes(argparse.Namespace(quick=True, images=None, batch_size=None, image_size=16), False, 1)


def test_workers_and_threads_leave_the_cores_to_each_other():
    assert gpu.loader_workers(cuda=True, cpus=16) == 15 and gpu.loader_workers(cuda=True, cpus=1) == 1
    assert gpu.loader_workers(cuda=True, cpus=96) == gpu.MAX_LOADER_WORKERS == 31  # a 1-GPU share of a big host
    assert gpu.loader_workers(cuda=False, cpus=16) == 1
    assert gpu.training_threads(cuda=False, cpus=2, workers=1) == 1
    assert gpu.training_threads(cuda=False, cpus=1, workers=1) == 1


def test_the_window_times_only_the_steps_after_the_warm_up():
    window = gpu.TimedWindow("stage1", 10**6, warmup=2, timed=3, max_s=60, device=torch.device("cpu"))
    window.add(torch.zeros(()), 4)
    for step in (1, 2, 3, 4):  # each step's batch is fetched (the wait added) before the step is done
        window.input.batches, window.input.waited_s = window.input.batches + 1, window.input.waited_s + step
        window.step_done(step, 0, 0.1, 0.9)
    assert window.started > 0 and window.timed_steps == 0
    window.input.batches, window.input.waited_s = window.input.batches + 1, window.input.waited_s + 5
    with pytest.raises(gpu.TimeUp):
        window.step_done(5, 0, 0.1, 0.9)
    assert window.timed_steps == 3 and window.stopped >= window.started
    # the batches fetched for steps 3, 4 and 5: not the warm-up's
    assert (window.timed_input.batches, window.timed_input.waited_s) == (3, 3 + 4 + 5)
    assert window.rate(4) == pytest.approx(12 / (window.stopped - window.started))
    short = gpu.TimedWindow("stage1", 10**6, warmup=1, timed=5, max_s=60, device=torch.device("cpu"))
    with pytest.raises(RuntimeError, match="ended after 0 steps, before 1 warm-up"):
        gpu.run_timed(lambda: None, short)  # an epoch shorter than warm-up + timed is refused
    assert gpu.img_per_s(10, 0.0) == 0.0 and gpu.img_per_s(0, 1.0) == 0.0 and gpu.img_per_s(10, 2.0) == 5.0


def test_the_busy_sampler_averages_its_reads_and_records_a_failure():
    reads = iter([50.0, 70.0, 90.0])
    done = threading.Event()

    def read():
        value = next(reads, None)
        if value is None:
            done.set()
            raise RuntimeError("nvml gone")
        return value

    sampler = gpu.BusySampler(read, period=0.001)
    sampler.start()
    assert done.wait(5)
    sampler.stop()
    assert sampler.samples == [50.0, 70.0, 90.0] and sampler.mean() == pytest.approx(70.0)
    assert sampler.error == "RuntimeError: nvml gone"
    assert gpu.BusySampler(lambda: 1.0).mean() is None
    assert gpu.nvml_reader(torch.device("cpu")) == (None, "no CUDA device")


def test_a_window_that_raises_after_the_warm_up_stops_its_busy_sampler():
    sampler = gpu.BusySampler(lambda: 50.0, period=0.001)
    window = gpu.TimedWindow("stage1", 10**6, warmup=1, timed=5, max_s=60, device=torch.device("cpu"), probe=sampler)
    window.add(torch.zeros(()), 4)

    def epoch():
        window.step_done(1, 0, 0.1, 0.9)  # the warm-up ends: the sampler starts
        raise RuntimeError("CUDA error: an illegal memory access (simulated)")

    with pytest.raises(RuntimeError, match="simulated"):
        gpu.run_timed(epoch, window)
    assert sampler._thread is not None and not sampler._thread.is_alive()  # no thread left polling nvml


def _cuda_run_with_stages_failing(tmp_path, monkeypatch) -> Bench:
    """``gpu._measure`` on the CUDA path at the CPU's quick sizes, where the caller has made each
    stage fail early (nothing trains): what the run does around its stages."""
    monkeypatch.setattr(gpu, "build_model", lambda *a: None)
    monkeypatch.setattr(gpu, "save_stage1", lambda *a: None)
    sizes = gpu.CPU_QUICK
    return gpu._measure(gpu.bench_config(sizes, 1, tmp_path), sizes, {1: [], 2: []}, "none", 1, True, tmp_path,
                        gpu.Outputs(tmp_path))


@pytest.mark.parametrize("why", ["ModuleNotFoundError: nvidia-ml-py does not seem to be installed or it can't be "
                                 "imported.", "RuntimeError: NVML_ERROR_NO_PERMISSION", None])
def test_on_cuda_a_missing_busy_row_is_one_line_that_says_how_to_get_it(tmp_path, monkeypatch, capsys, why):
    """The CUDA path with its stages skipped (each fails at once): where nvml does not answer, the
    run says so in one line, printed, listed under "Not measured" and in bench.json, instead of
    dropping Stage I's "GPU busy >= 90%" row without a word."""
    monkeypatch.setattr(gpu, "nvml_reader", lambda device: (None, why) if why else (lambda: 95.0, ""))
    monkeypatch.setattr(gpu, "measure_stage", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("skipped")))
    bench = _cuda_run_with_stages_failing(tmp_path, monkeypatch)
    busy = [line for line in bench.failures if line.startswith("GPU busy")]
    if why is None:  # nvml answers: nothing to say
        assert busy == []
        return
    assert len(busy) == 1, bench.failures
    fix = gpu.NVML_FIX if why.startswith("ModuleNotFoundError") else gpu.NVML_DOWN
    assert busy == [f"GPU busy (nvml), both stages: not measured ({why}); {fix}"]
    assert ("pip install -e '.[gpu]'" in busy[0]) == why.startswith("ModuleNotFoundError")
    assert busy[0] in capsys.readouterr().out
    assert busy[0] in json.loads((tmp_path / "bench-gpu" / "bench.json").read_text())["failures"]


def test_on_cuda_nvml_is_probed_once_and_each_stage_samples_with_that_reader(tmp_path, monkeypatch):
    """The CUDA path up to each stage's data (then skipped): one nvml probe for the whole run, its
    reader handed to both stages' busy samplers."""
    probes, sampled = [], []

    def utilisation() -> float:
        return 95.0

    monkeypatch.setattr(gpu, "nvml_reader", lambda device: probes.append(device) or (utilisation, ""))
    monkeypatch.setattr(gpu.torch.cuda, "reset_peak_memory_stats", lambda *a: None)
    monkeypatch.setattr(gpu, "_build_state", lambda *a: argparse.Namespace(runtime=argparse.Namespace(device="cuda")))
    monkeypatch.setattr(gpu, "BusySampler", sampled.append)
    monkeypatch.setattr(gpu, "stage_data", lambda *a: (_ for _ in ()).throw(RuntimeError("skipped")))
    bench = _cuda_run_with_stages_failing(tmp_path, monkeypatch)
    assert len(probes) == 1 and sampled == [utilisation, utilisation]
    failed = [line.split(":")[0] for line in bench.failures]
    assert failed == ["Stage I (the whole stage)", "Stage II (the whole stage)"]  # each stage got as far as its data


def test_gpu_with_too_few_jpegs_under_data_root_gives_its_own_advice(tmp_path):
    # in gpu, --images sets the timed steps, not the files: "lower --images" would not help
    from PIL import Image
    train = tmp_path / "mini" / "train" / "REAL"
    train.mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (64, 64), (i, 90, 60)).save(train / f"{i}.jpg", quality=75)
    with pytest.raises(SystemExit) as exc:
        gpu.stage_images(tmp_path / "mini", gpu.CPU_QUICK, tmp_path / "work")
    message = str(exc.value)
    assert message.startswith(f"gpu: {tmp_path / 'mini'} holds 3 JPEG files, the benchmark needs "
                              f"{gpu.CPU_QUICK[1].files}; in gpu --images does not change that")
    assert "lower --images" not in message and "leave it out to use generated ones" in message


def test_on_cuda_the_rows_carry_the_issues_targets():
    bench = Bench("gpu")
    figures = gpu.StageFigures(3600.0, 3800.0, 300, 300, 93.0, "", 21.5, 30, 9000.0, 12000.0)
    for stage in (1, 2):
        gpu.add_rows(bench, stage, gpu.CUDA_FULL[stage], figures, cuda=True, workers=15)
    targets = {r.what: r.target for r in bench.rows}
    assert targets == {"Stage I training (engine)": 3500.0, "Stage I input path vs model alone": 0.90,
                       "Stage I GPU busy (nvml)": 90.0, "Stage I peak GPU memory": None,
                       "Stage I loader alone": None, "Stage I augmentation alone": None,
                       "Stage II training (engine)": 170.0, "Stage II input path vs model alone": None,
                       "Stage II GPU busy (nvml)": None, "Stage II peak GPU memory": None,
                       "Stage II loader alone": None, "Stage II augmentation alone": None}
    assert bench.rows[4].ratio == pytest.approx(2.5)  # loader alone 9000 against the engine's 3600
    decoded = Bench("gpu")  # the decode row stands against one core's PIL, not the engine
    gpu.add_rows(decoded, 1, gpu.CUDA_FULL[1], replace(figures, decode_batched=9000.0, decode_pil=600.0), cuda=True,
                 workers=15)
    assert decoded.rows[-1].what == "Stage I decode, batched decode_jpeg vs PIL on one core"
    assert decoded.rows[-1].ratio == pytest.approx(15.0) and decoded.rows[-1].target is None
    assert "cuda (nvJPEG)" in decoded.rows[-1].note
    assert all(gpu.CPU_NOTE not in r.note for r in bench.rows)
    assert "10% of the timed steps" in bench.rows[0].note  # 30 queued batches against 300 timed
    timed = Bench("gpu")  # where the input path's time went, on the thread that runs ahead on CUDA
    gpu.add_rows(timed, 1, gpu.CUDA_FULL[1], replace(figures, input_times=gpu.InputTimes(300, 0.3, 3.0, 6.0),
                                                     engine_s=30.0), cuda=True, workers=15)
    assert ("the training loop waited 1.00 ms a batch for its next one (input wait 1% of the time); the side "
            "preparing batches (a thread running ahead) waited 10.00 ms a batch on the DataLoader and spent 20.00 ms "
            "on the copy and the augmentation (host time: its launches and its one mask read)") in timed.rows[1].note
    assert "input wait" not in bench.rows[1].note  # nothing timed, nothing said
    no_nvml = Bench("gpu")
    gpu.add_rows(no_nvml, 1, gpu.CUDA_FULL[1], gpu.StageFigures(3000.0, 3800.0, 300, 300, None,
                                                                  "ModuleNotFoundError: pynvml", 21.5, 30, 4000.0),
                 cuda=True, workers=15)
    assert [r.what for r in no_nvml.rows] == ["Stage I training (engine)", "Stage I input path vs model alone",
                                            "Stage I peak GPU memory", "Stage I loader alone"]
    assert "nvml not available (ModuleNotFoundError: pynvml)" in no_nvml.rows[1].note
    assert no_nvml.rows[0].met is False and no_nvml.rows[1].met is False  # 3000 < 3500; 0.79 < 0.90


def _engine_target(args: argparse.Namespace, workers: int, rate: float, steps: int | None = None,
                   seconds: float = 30.0, stage: int = 1):
    """The engine row (and the markdown) a CUDA run planned by ``args`` would get at ``rate``."""
    size = gpu.plan_sizes(args, cuda=True, workers=workers)[stage]
    steps = size.timed if steps is None else steps
    figures = gpu.StageFigures(rate, 4500.0, steps, steps, 95.0, "", 9.3, gpu.queued_batches(workers, cuda=True),
                               engine_s=seconds)
    bench = Bench("gpu")
    gpu.add_rows(bench, stage, size, figures, cuda=True, workers=workers)
    return {r.what.split(" ", 2)[-1]: r for r in bench.rows}, bench.markdown()


def test_the_targets_judge_only_full_runs_at_the_papers_sizes():
    """A box steady at 2,850 img/s reads 4,457 under --quick with 31 workers (the 65 batches
    prepared during the warm-up serve all 60 timed steps): no target may call that met. Nor may
    one set for 224 px at batch 200 judge another size."""
    def ns(**kw):
        return argparse.Namespace(**{"quick": False, "images": None, "batch_size": None, "image_size": None, **kw})

    judged = ("training (engine)", "input path vs model alone", "GPU busy (nvml)")
    for args, workers in ((ns(quick=True), 31), (ns(quick=True), 15), (ns(images=2000), 31),
                          (ns(image_size=64, batch_size=512), 15), (ns(batch_size=100), 15)):
        rows, md = _engine_target(args, workers, rate=4457.0)
        for what in judged:
            assert rows[what].target is None and rows[what].met is None, (args, what)
            assert rows[what].no_target.startswith("none: ")
        assert "no target: the targets apply at the paper's sizes" in rows["training (engine)"].note
        assert f"| {rows['training (engine)'].no_target} |" in md  # the target column says why
    rows, _ = _engine_target(ns(quick=True), 31, rate=4457.0)
    assert rows["training (engine)"].no_target == "none: 60 timed steps, 65 prepared ahead (needs 650)"
    rows, _ = _engine_target(ns(image_size=64, batch_size=512), 15, rate=20000.0)
    assert rows["training (engine)"].no_target == "none: set for 224 px, batch 200"
    # a full run, and --images large enough to cover the prepared batches, are judged
    for args in (ns(), ns(images=200 * 650)):
        rows, md = _engine_target(args, 31, rate=3600.0)
        assert [rows[what].target for what in judged] == [3500.0, 0.90, 90.0] and rows["training (engine)"].met
        assert "| >= 3500 img/s | yes |" in md
    # a full run that the 45-s clock stopped short of 650 steps is slow, and judged: it fails
    rows, _ = _engine_target(ns(), 31, rate=2800.0, steps=630, seconds=gpu.MAX_TIMED_S + 0.01)
    assert rows["training (engine)"].target == 3500.0 and rows["training (engine)"].met is False
    rows, _ = _engine_target(ns(), 31, rate=170.5, steps=640, seconds=gpu.MAX_TIMED_S + 0.01, stage=2)
    assert rows["training (engine)"].target == 170.0
    # but a window cut short without a clock to blame (fewer steps than prepared x10) is not
    rows, _ = _engine_target(ns(), 31, rate=3600.0, steps=100, seconds=5.0)
    assert rows["training (engine)"].target is None


def test_the_step_clock_splits_each_call_between_its_steps(monkeypatch):
    now = iter([0.0, 0.5, 2.0, 10.0, 10.25, 11.0])
    monkeypatch.setattr(gpu.time, "perf_counter", lambda: next(now))
    clock = gpu.StepClock(torch.device("cpu"))
    for _ in range(2):
        clock.start()
        clock("draw")
        clock("JPEG")
    assert clock.ms() == {"draw": pytest.approx(375.0), "JPEG": pytest.approx(1125.0)}  # (0.5+0.25)/2, (1.5+0.75)/2 s
    assert gpu.StepClock(torch.device("cpu")).ms() == {}


@cpu_only
def test_prepared_trains_from_a_cache_built_for_every_stage_first(tmp_path, monkeypatch):
    from trueface.data.prepared import PreparedImages

    built = []

    def build(samples, size, cache_dir, **kw):
        result = gpu_build(samples, size, cache_dir, **kw)
        built.append((size, len(samples), result, PreparedImages.open(cache_dir, size).coverage(samples)))
        return result

    gpu_build = gpu.build_prepared
    monkeypatch.setattr(gpu, "build_prepared", build)
    assert benchmark.main(["gpu", "--quick", "--prepared", "--results-dir", str(tmp_path)]) == 0
    payload = json.loads((tmp_path / "bench-gpu" / "bench.json").read_text())
    assert payload["context"]["data.prepared"] == "uint8"
    q = gpu.CPU_QUICK
    # one cache per stage at its decode size, every file prepared now and held afterwards
    assert [(n, result, held) for _, n, result, held in built] == [(q[s].files, (0, q[s].files), q[s].files) for s in (1, 2)]
    assert all(r["project"] > 0 for r in payload["rows"])


@cpu_only
def test_a_failure_costs_only_what_failed_and_the_exit_status_says_so(tmp_path, monkeypatch):
    """Stage I fails as a whole and the batched decode fails in each stage (as where torchvision has
    no nvJPEG): Stage II still runs from fresh weights, every other row is there, the failures are
    listed in bench.json and bench.md, and the CLI exits 1. The training step's synchronisations
    are counted without the copy that makes its test batch (a pageable copy waits for the GPU)."""
    real_window, real_syncs, real_batches = gpu.engine_window, gpu.host_syncs, gpu.device_batches
    counting, made_while_counting = [False], []

    def window(cfg, stage, *a, **k):
        if stage == 1:
            raise RuntimeError("CUDA out of memory (simulated)")
        return real_window(cfg, stage, *a, **k)

    def no_decode(*a, **k):
        raise RuntimeError("torchvision was built without nvJPEG (simulated)")

    def syncs(fn, device):
        counting[0] = True
        try:
            return real_syncs(fn, device)
        finally:
            counting[0] = False

    def batches(*a, **k):
        made_while_counting.append(counting[0])
        return real_batches(*a, **k)

    for name, fake in (("engine_window", window), ("decode_alone", no_decode), ("host_syncs", syncs),
                       ("device_batches", batches)):
        monkeypatch.setattr(gpu, name, fake)
    assert benchmark.main(["gpu", "--quick", "--results-dir", str(tmp_path)]) == 1
    payload = json.loads((tmp_path / "bench-gpu" / "bench.json").read_text())
    assert [r["what"] for r in payload["rows"]] == [r for r in ROWS if r.startswith("Stage II") and "decode" not in r]
    assert all(r["project"] > 0 for r in payload["rows"])
    assert payload["failures"] == [
        "Stage I (the whole stage): not measured (RuntimeError: CUDA out of memory (simulated))",
        "Stage II decode: not measured (RuntimeError: torchvision was built without nvJPEG (simulated))"]
    md = (tmp_path / "bench-gpu" / "bench.md").read_text()
    assert "**Not measured:**" in md and all(f"- {line}" in md for line in payload["failures"])
    assert made_while_counting and not any(made_while_counting)  # Stage II's model-alone batches and the step's


@cpu_only
def test_a_loader_that_fails_to_start_costs_only_the_rows_that_need_it(tmp_path, monkeypatch):
    """The diagnostics' fresh loader fails as it starts (as when a host runs out of file handles):
    each stage keeps its engine and model-alone rows and its decode row, loses the loader and
    augmentation rows that read that loader, and says why."""
    real_epoch, calls = gpu.first_strong_epoch, Counter()

    def epoch(cfg, stage, *a, **k):
        calls[stage] += 1
        if calls[stage] > 1:  # the engine window's loader starts; the diagnostics' does not
            raise OSError(24, "Too many open files (simulated)")
        return real_epoch(cfg, stage, *a, **k)

    monkeypatch.setattr(gpu, "first_strong_epoch", epoch)
    assert benchmark.main(["gpu", "--quick", "--results-dir", str(tmp_path)]) == 1
    payload = json.loads((tmp_path / "bench-gpu" / "bench.json").read_text())
    assert [r["what"] for r in payload["rows"]] == [r for r in ROWS if "alone" not in r.split(" vs ")[0]]
    assert payload["failures"] == [
        f"{stage} loader alone: not measured (OSError: [Errno 24] Too many open files (simulated))"
        for stage in ("Stage I", "Stage II")]
    assert calls == {1: 2, 2: 2}


@cpu_only
@pytest.mark.parametrize("killed_in", ["Stage II", "Stage I's trace"])
def test_the_stages_finished_are_written_before_a_later_one_is_stopped(tmp_path, monkeypatch, killed_in):
    """gpu_check.sh's timeout kills the run mid-stage, or in the trace after a stage: Stage I's
    rows must be on disk by then."""

    class Killed(BaseException):  # not an Exception: nothing in the run may catch it, as with a signal
        pass

    real_measure = gpu.measure_stage

    def measure(cfg, stage, *a, **k):
        if stage == 2:
            raise Killed
        return real_measure(cfg, stage, *a, **k)

    def trace(*a, **k):
        raise Killed

    monkeypatch.setattr(gpu, "measure_stage", measure)
    monkeypatch.setattr(gpu, "trace_stage", trace)
    args = argparse.Namespace(quick=True, images=None, batch_size=None, image_size=None, data_root=None,
                              prepared=False, trace=killed_in == "Stage I's trace", results_dir=tmp_path)
    with pytest.raises(Killed):
        gpu.run(args)
    payload = json.loads((tmp_path / "bench-gpu" / "bench.json").read_text())
    assert [r["what"] for r in payload["rows"]] == [r for r in ROWS if r.startswith("Stage I ")]
    # what was cut off says so: Stage II, and Stage I too where its trace was (a stage ends with its trace)
    assert payload["failures"] == [gpu.unfinished(s) for s in ((1, 2) if killed_in == "Stage I's trace" else (2,))]
    assert "Stage II: not finished" in (tmp_path / "bench-gpu" / "bench.md").read_text()


@cpu_only
def test_a_run_stopped_in_stage_one_leaves_no_earlier_run_to_pass_for_its_own(tmp_path, monkeypatch):
    """gpu_check.sh's timeout stops the run in Stage I: the earlier run's bench.json (both stages
    met) and its traces must not survive to be read as this run's."""

    class Killed(BaseException):
        pass

    out = tmp_path / "bench-gpu"
    out.mkdir()
    old = {"name": "gpu", "context": {}, "failures": [],
           "rows": [{"what": "Stage I training (engine)", "project": 4000.0, "met": True}]}
    (out / "bench.json").write_text(json.dumps(old))
    (out / "bench.md").write_text("old table\n")
    for name in ("trace-stage1.json.gz", "trace-stage1-ops.txt", "trace-stage2.json.gz", "trace-stage2.json"):
        (out / name).write_text("an earlier run's")
    seen = []

    def measure(cfg, stage, *a, **k):  # what a reader finds on disk while Stage I runs
        seen.append(json.loads((out / "bench.json").read_text()))
        raise Killed

    monkeypatch.setattr(gpu, "measure_stage", measure)
    args = argparse.Namespace(quick=True, images=None, batch_size=None, image_size=None, data_root=None,
                              prepared=False, trace=False, results_dir=tmp_path)
    with pytest.raises(Killed):
        gpu.run(args)
    payload = json.loads((out / "bench.json").read_text())
    assert payload["rows"] == [] and payload["failures"] == [gpu.unfinished(1), gpu.unfinished(2)]
    assert seen[0]["failures"] == payload["failures"] and seen[0]["context"]["sizes"]  # this run's context
    assert "not finished" in (out / "bench.md").read_text()
    assert sorted(p.name for p in out.iterdir()) == ["bench.json", "bench.md"]  # no earlier trace left


def test_the_tracer_records_the_augmentation_thread_as_well_as_the_training_loop(tmp_path):
    from tests.test_augment_ahead import CPU, epoch_augment, uint8_loader
    from trueface.augment_ahead import training_batches

    tracer = gpu.Tracer(cuda=False)
    tracer.start()
    with training_batches(uint8_loader(3), CPU, epoch_augment(), 3, ahead=True) as batches:  # the thread, as on CUDA
        for images, _, _ in batches:
            with torch.profiler.record_function("trueface.train_step"):
                images.sum()
    tracer.stop()
    tracer.stop()  # a second stop (after an error) does nothing
    table = tracer.write(tmp_path / "trace-stage1.json.gz")
    events = read_trace(tmp_path / "trace-stage1.json.gz")
    threads = {name: {e["tid"] for e in events if e.get("name") == name}
               for name in ("trueface.augment", "trueface.train_step")}
    assert tracer.threads == "every thread"
    assert len(threads["trueface.augment"]) == 1 and len(threads["trueface.train_step"]) == 1
    assert threads["trueface.augment"] != threads["trueface.train_step"]  # two threads, both recorded
    assert "Self CPU" in table and (tmp_path / "trace-stage1-ops.txt").read_text() == table


def test_compile_reaches_the_config_the_engine_and_the_model_alone_are_built_from(tmp_path, monkeypatch):
    # --compile is runtime.compile=true in the one config both windows use (_build_state compiles the
    # training forward from it: tests/test_train_device_augment.py); without it, eager, as in training
    seen = []
    monkeypatch.setattr(gpu, "_measure", lambda cfg, *a, **k: seen.append(cfg) or Bench("gpu"))
    for argv in (["gpu", "--quick", "--compile"], ["gpu", "--quick"]):
        args = benchmark.parse_args([*argv, "--results-dir", str(tmp_path)])
        gpu.run(args)
    assert [cfg.runtime.compile for cfg in seen] == [True, False]
    assert load_config("paper").runtime.compile is False  # what a run trains with unless told


@cpu_only
def test_with_compile_the_model_alone_is_timed_compiled_and_then_eager_on_the_same_state(tmp_path, monkeypatch):
    # one run answers what compiling buys: the model-alone window compiled, then again with the
    # stage's bare module (same weights, optimizer and batches), in a row of its own per stage;
    # torch.compile's stand-in keeps the forward as it is (compiling takes minutes here)
    from tests.test_train_device_augment import _Compiled

    forwards, real_step = Counter(), trueface.train.train_step

    def step(state, *a, **k):
        compiled = isinstance(state.train_model, _Compiled)
        assert compiled or state.train_model is state.model
        forwards["compiled" if compiled else "eager"] += 1
        return real_step(state, *a, **k)

    monkeypatch.setattr(torch, "compile", lambda model, **kw: _Compiled(model))
    monkeypatch.setattr(trueface.train, "train_step", step)
    assert benchmark.main(["gpu", "--quick", "--compile", "--results-dir", str(tmp_path)]) == 0
    rows = {r["what"]: r for r in json.loads((tmp_path / "bench-gpu" / "bench.json").read_text())["rows"]}
    size = gpu.CPU_QUICK
    assert forwards["eager"] == sum(size[s].warmup + size[s].timed for s in (1, 2))  # the eager windows' steps only
    assert forwards["compiled"] > forwards["eager"]  # the engine, the compiled model alone, the counted step
    for stage in ("Stage I", "Stage II"):
        row = rows[f"{stage} model alone, compiled vs eager"]
        assert row["project"] == rows[f"{stage} input path vs model alone"]["reference"]  # the compiled window's
        assert row["reference"] > 0 and row["target"] is None
        first = re.search(r"the first step took (\d+\.\d) s", rows[f"{stage} training (engine)"]["note"])
        assert first and float(first[1]) > 0 and f"first step ({first[1]} s)" in row["note"]


def test_the_model_alone_gets_batches_of_the_type_the_augmentation_hands_the_model(monkeypatch):
    # float16 where a CUDA run augments in it: a compiled forward is compiled for one input type
    # (a float32 batch would compile it again inside the timed window), and a float16 batch is half
    # the bytes of the first layer's cast
    from trueface.precision import Runtime
    cpu = Runtime(torch.device("cpu"), "fp32", None)
    assert {b[0].dtype for b in gpu.device_batches(8, 2, cpu)} == {torch.float32}
    monkeypatch.setattr(Runtime, "augment_dtype", property(lambda self: torch.float16))
    batches = gpu.device_batches(8, 2, cpu)
    assert len(batches) == gpu.DISTINCT_BATCHES and {b[0].dtype for b in batches} == {torch.float16}
    assert batches[0][0].shape == (2, 3, 8, 8) and not torch.equal(batches[0][0], batches[1][0])
