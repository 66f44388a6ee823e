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
