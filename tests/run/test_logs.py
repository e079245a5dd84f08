"""The run's metric sinks."""

import json
import sys

from lmadapt.run.logs import MetricsLogger, read_metrics


def test_a_missing_tensorboardx_leaves_metrics_jsonl_and_one_warning(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # `import tensorboardX` raises ImportError
    warnings = []
    logger = MetricsLogger(str(tmp_path), tensorboard=True, warn=warnings.append)
    logger.write(3, {"loss": 2.5})
    logger.close()
    assert len(warnings) == 1 and "tensorboardX is not installed" in warnings[0]
    assert "logging.tensorboard=false" in warnings[0]
    assert [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [
        {"step": 3, "train/loss": 2.5}]
    assert read_metrics(str(tmp_path)) == [{"step": 3, "train/loss": 2.5}]
    assert not (tmp_path / "tb").exists()
