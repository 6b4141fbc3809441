"""Reading the audit's scalars back from TensorBoard event files."""

from __future__ import annotations

from pathlib import Path

from torch.utils.tensorboard import SummaryWriter

from grad_callbacks.sinks.events import event_files, read_audit_scalars


def _write(run_dir: Path, points: dict[str, list[tuple[int, float]]]) -> None:
    writer = SummaryWriter(str(run_dir))
    for tag, series in points.items():
        for step, value in series:
            writer.add_scalar(tag, value, global_step=step)
    writer.add_text("grad_audit/findings", "No findings.", global_step=0)
    writer.close()


def test_reads_every_grad_audit_scalar_and_nothing_else(tmp_path: Path) -> None:
    _write(
        tmp_path,
        {
            "grad_audit/zero_grad/uncleared_params": [(1, 0.0), (2, 4.0), (3, 4.0)],
            "grad_audit/zero_grad/microbatches": [(1, 1.0), (2, 2.0)],
            "train_loss": [(0, 1.5)],
            "other/grad_audit/x": [(0, 1.0)],
        },
    )
    scalars = read_audit_scalars(tmp_path)
    assert scalars == {
        "grad_audit/zero_grad/microbatches": [(1, 1.0), (2, 2.0)],
        "grad_audit/zero_grad/uncleared_params": [(1, 0.0), (2, 4.0), (3, 4.0)],
    }
    assert list(scalars) == sorted(scalars)


def test_keeps_every_point_of_long_series(tmp_path: Path) -> None:
    # TensorBoard's default size guidance keeps 1000 scalars per tag; all must be read.
    _write(tmp_path, {"grad_audit/monitor/norm": [(s, s / 10) for s in range(2500)]})
    series = read_audit_scalars(tmp_path)["grad_audit/monitor/norm"]
    assert len(series) == 2500
    assert series[0] == (0, 0.0) and series[-1][0] == 2499


def test_reads_every_event_file_of_a_resumed_run(tmp_path: Path) -> None:
    _write(tmp_path, {"grad_audit/zero_grad/stale_params": [(1, 0.0), (2, 0.0)]})
    _write(tmp_path, {"grad_audit/zero_grad/stale_params": [(3, 1.0)]})
    assert len(event_files(tmp_path)) == 2
    steps = [s for s, _ in read_audit_scalars(tmp_path)["grad_audit/zero_grad/stale_params"]]
    assert steps == [1, 2, 3]


def test_no_event_files_or_no_directory_gives_nothing(tmp_path: Path) -> None:
    assert read_audit_scalars(tmp_path) == {}
    assert read_audit_scalars(tmp_path / "missing") == {}
    _write(tmp_path, {"train_loss": [(0, 1.0)]})
    assert read_audit_scalars(tmp_path) == {}
