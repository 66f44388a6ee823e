"""The training log files every ``runtime train`` command writes: loss.csv columns and formats,
loss.png."""

from __future__ import annotations

from training import outputs


def test_log_table_csv_formats_and_loss_plot(tmp_path):
    log = {"loss": [1.0, 0.5], "mask_loss": [0.25, 0.125], "lr": [1e-5, 3.5e-4]}
    outputs.write_log_table_csv(tmp_path / "loss.csv", log, ("loss", "mask_loss", "lr"))
    assert (tmp_path / "loss.csv").read_text().splitlines() == [
        "step,loss,mask_loss,lr", "1,1.000000,0.250000,1e-05", "2,0.500000,0.125000,0.00035"]
    outputs.write_losses_plot(tmp_path / "loss.png", log, (("loss", "tab:blue"), ("mask_loss", "tab:orange")), "t")
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".*tmp*"))
    assert outputs.moving_average([1.0, 3.0, 5.0], 2) == [1.0, 2.0, 4.0]


def test_run_records_and_periodic_actions(tmp_path):
    import json

    from training.common import due

    assert [d for d in range(1, 11) if due(d, 3, 10)] == [3, 6, 9] and not any(due(d, 0, 10) for d in range(1, 11))
    assert not due(10, 5, 10)  # the last step has its own final evaluation / save
    evals = [{"step": 0, "acc": 0.1}, {"step": 5, "acc": 0.5, "examples": ["x"]}]
    outputs.write_run_records(tmp_path, {"device": "cpu"}, [{"command": "a"}, {"command": "b"}], evals, step=5,
                              finished=True, seconds=2.0, eval_seed=1000, summary={"loss_last": 0.3},
                              config_extra={"weights_fingerprint": "f"}, metrics_extra={"gain": 0.4})
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["command"] == "b" and config["steps_done"] == 5 and config["weights_fingerprint"] == "f"
    assert config["device"] == "cpu" and config["loss_last"] == 0.3 and len(config["invocations"]) == 2
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["eval"] == evals[1] and metrics["initial_eval"] == evals[0] and metrics["gain"] == 0.4
    assert metrics["history"][1] == {"step": 5, "acc": 0.5} and metrics["eval_seed"] == 1000
