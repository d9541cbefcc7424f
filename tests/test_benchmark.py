from jobs import benchmark


def test_benchmark_runs_one_epoch_and_prints_throughput(capsys):
    assert benchmark.main(["--image-size", "32", "--batch-size", "8", "--images", "16", "--loader-workers", "0",
                           "stage1.lr=0.001"]) == 0
    out = capsys.readouterr().out
    assert "device cpu" in out and "images/s" in out and "16 images in" in out
