"""Selection (SPEC 1.2, 1.3): ordering, --start/--end/--last, aliases and collisions, without files."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from ckpt_avg.discover import CheckpointRef
from ckpt_avg.errors import SelectionError, UsageError
from ckpt_avg.naming import parse_name
from ckpt_avg.select import Candidate, Plan, SelectOptions, describe_order, make_plan


def candidates(
    names: Sequence[str],
    *,
    explicit: bool = False,
    contents: dict[str, tuple[int | None, int | None]] | None = None,
) -> list[Candidate]:
    """Candidates as discovery would build them; `contents` gives (epoch, step) read from inside a file."""
    result = []
    for order, name in enumerate(names):
        info = parse_name(name)
        ref = CheckpointRef(
            display=f"ckpts/{name}", files=(f"ckpts/{name}",), is_directory=False, explicit=explicit,
            order=order, size=1000, name=info,
        )  # fmt: skip
        epoch, step = info.epoch, info.step
        if contents and name in contents:
            inside_epoch, inside_step = contents[name]
            epoch = epoch if epoch is not None else inside_epoch
            step = step if step is not None else inside_step
        result.append(Candidate(ref, epoch, step, dict(info.metrics)))
    return result


def selected_names(plan: Plan) -> list[str]:
    return [c.ref.display.removeprefix("ckpts/") for c in plan.selected]


def reasons(plan: Plan) -> dict[str, str]:
    return {e.candidate.ref.display.removeprefix("ckpts/"): e.reason for e in plan.entries if not e.selected}


EPOCHS = [f"epoch={k}.ckpt" for k in range(12)]  # epoch=0 .. epoch=11


def test_numeric_order_not_string_order() -> None:
    names = sorted(EPOCHS)  # string order: epoch=0, epoch=1, epoch=10, epoch=11, epoch=2, ...
    assert names[2] == "epoch=10.ckpt"
    plan = make_plan(candidates(names), SelectOptions())
    assert plan.by == "epoch"
    assert selected_names(plan) == EPOCHS
    assert [e.index for e in plan.entries] == list(range(12))


def test_nine_before_ten_in_steps() -> None:
    names = ["step=10000.ckpt", "step=9000.ckpt", "step=100.ckpt"]
    plan = make_plan(candidates(names), SelectOptions())
    assert plan.by == "step"
    assert selected_names(plan) == ["step=100.ckpt", "step=9000.ckpt", "step=10000.ckpt"]


def test_start_integer_is_inclusive() -> None:
    plan = make_plan(candidates(EPOCHS), SelectOptions(start=9))
    assert selected_names(plan) == ["epoch=9.ckpt", "epoch=10.ckpt", "epoch=11.ckpt"]
    why = reasons(plan)
    assert set(why) == {f"epoch={k}.ckpt" for k in range(9)}
    assert all("--start" in r for r in why.values())


def test_start_zero_keeps_everything() -> None:
    assert len(make_plan(candidates(EPOCHS), SelectOptions(start=0)).selected) == 12


@pytest.mark.parametrize(
    ("count", "fraction", "kept"),
    [
        (12, 0.75, 3),  # floor(9.0) = 9 dropped
        (10, 0.75, 3),  # floor(7.5) = 7 dropped
        (5, 0.5, 3),  # floor(2.5) = 2 dropped
        (7, 0.8, 2),  # floor(5.6) = 5 dropped, as Lightning's int(0.8 * max_epochs)
        (3, 0.1, 3),  # floor(0.3) = 0 dropped
        (4, 0.99, 1),  # floor(3.96) = 3 dropped
    ],
)
def test_start_fraction_keeps_the_last_part(count: int, fraction: float, kept: int) -> None:
    names = [f"epoch_{k}.pt" for k in range(1, count + 1)]
    plan = make_plan(candidates(names), SelectOptions(start=fraction))
    assert selected_names(plan) == names[count - kept :]
    assert len(reasons(plan)) == count - kept


def test_start_fraction_counts_candidates_not_epoch_numbers() -> None:
    # Epochs 10..19: the fraction is of the 10 candidates, not of the epoch numbers.
    names = [f"epoch_{k}.pt" for k in range(10, 20)]
    plan = make_plan(candidates(names), SelectOptions(start=0.5))
    assert selected_names(plan) == names[5:]


def test_start_fraction_ignores_duplicate_aliases() -> None:
    names = [*(f"epoch={k}.ckpt" for k in range(4)), "last.ckpt"]
    plan = make_plan(candidates(names, contents={"last.ckpt": (3, 40)}), SelectOptions(start=0.5))
    assert selected_names(plan) == ["epoch=2.ckpt", "epoch=3.ckpt"]
    assert "alias" in reasons(plan)["last.ckpt"]


def test_end_is_inclusive() -> None:
    plan = make_plan(candidates(EPOCHS), SelectOptions(end=2))
    assert selected_names(plan) == ["epoch=0.ckpt", "epoch=1.ckpt", "epoch=2.ckpt"]
    assert all("--end" in r for r in reasons(plan).values())


def test_start_and_end_reproduce_lightning_swa() -> None:
    # swa_epoch_start=4, max_epochs=10 -> Lightning averages epochs 2..8: --start 2 --end 8.
    plan = make_plan(candidates(EPOCHS[:10]), SelectOptions(start=2, end=8))
    assert selected_names(plan) == [f"epoch={k}.ckpt" for k in range(2, 9)]


def test_last_keeps_the_highest() -> None:
    plan = make_plan(candidates(list(reversed(EPOCHS))), SelectOptions(last=3))
    assert selected_names(plan) == ["epoch=9.ckpt", "epoch=10.ckpt", "epoch=11.ckpt"]
    assert all("--last" in r for r in reasons(plan).values())


def test_last_applies_after_start_and_end() -> None:
    plan = make_plan(candidates(EPOCHS), SelectOptions(start=2, end=6, last=2))
    assert selected_names(plan) == ["epoch=5.ckpt", "epoch=6.ckpt"]
    plan = make_plan(candidates(EPOCHS), SelectOptions(last=20))
    assert len(plan.selected) == 12


def test_start_after_end_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match=r"--start 8 is after --end 3"):
        make_plan(candidates(EPOCHS), SelectOptions(start=8, end=3))


@pytest.mark.parametrize(
    "options",
    [
        SelectOptions(start=-1),
        SelectOptions(start=1.5),
        SelectOptions(last=0),
        SelectOptions(by="name"),
    ],
)
def test_bad_options_are_usage_errors(options: SelectOptions) -> None:
    with pytest.raises(UsageError):
        make_plan(candidates(EPOCHS), options)


def test_usage_error_exits_2() -> None:
    assert UsageError.exit_code == 2
    assert SelectionError.exit_code == 1


def test_alias_skipped_when_its_index_is_taken() -> None:
    names = ["epoch=0.ckpt", "epoch=1.ckpt", "epoch=2.ckpt", "last.ckpt", "last-v1.ckpt"]
    plan = make_plan(candidates(names, contents={"last.ckpt": (2, 30), "last-v1.ckpt": (1, 20)}), SelectOptions())
    assert selected_names(plan) == ["epoch=0.ckpt", "epoch=1.ckpt", "epoch=2.ckpt"]
    why = reasons(plan)
    assert set(why) == {"last.ckpt", "last-v1.ckpt"}
    assert "alias" in why["last.ckpt"] and "2" in why["last.ckpt"]
    assert "alias" in why["last-v1.ckpt"] and "1" in why["last-v1.ckpt"]


def test_alias_used_when_it_is_the_only_copy_of_its_index() -> None:
    # Lightning with save_top_k=2 may leave last.ckpt as the only copy of the final epoch.
    names = ["epoch=0.ckpt", "epoch=1.ckpt", "last.ckpt"]
    plan = make_plan(candidates(names, contents={"last.ckpt": (2, 30)}), SelectOptions())
    assert selected_names(plan) == ["epoch=0.ckpt", "epoch=1.ckpt", "last.ckpt"]
    assert [e.index for e in plan.entries] == [0, 1, 2]


def test_alias_without_any_index_is_skipped() -> None:
    names = ["epoch=0.ckpt", "epoch=1.ckpt", "model_best.pth.tar"]
    plan = make_plan(candidates(names), SelectOptions())
    assert selected_names(plan) == ["epoch=0.ckpt", "epoch=1.ckpt"]
    assert "alias" in reasons(plan)["model_best.pth.tar"]


def test_fairseq_aliases_and_best_with_metric_in_name() -> None:
    names = [f"checkpoint{k}.pt" for k in range(1, 6)]
    names += ["checkpoint_best.pt", "checkpoint_last.pt", "checkpoint.best_bleu_28.5.pt"]
    contents = {
        "checkpoint_best.pt": (3, None),
        "checkpoint_last.pt": (5, None),
        "checkpoint.best_bleu_28.5.pt": (3, None),
    }
    plan = make_plan(candidates(names, contents=contents), SelectOptions())
    assert selected_names(plan) == [f"checkpoint{k}.pt" for k in range(1, 6)]
    assert set(reasons(plan)) == {"checkpoint_best.pt", "checkpoint_last.pt", "checkpoint.best_bleu_28.5.pt"}


def test_fairseq_end_of_epoch_beats_mid_epoch() -> None:
    names = [
        "checkpoint5.pt",
        "checkpoint6.pt",
        "checkpoint_6_182000.pt",
        "checkpoint_6_181000.pt",
        "checkpoint_7_200000.pt",
    ]
    plan = make_plan(candidates(names), SelectOptions())
    assert plan.by == "epoch"
    # Epoch 7 has only a mid-epoch checkpoint: it is kept.
    assert selected_names(plan) == ["checkpoint5.pt", "checkpoint6.pt", "checkpoint_7_200000.pt"]
    why = reasons(plan)
    assert set(why) == {"checkpoint_6_182000.pt", "checkpoint_6_181000.pt"}
    for reason in why.values():
        assert "mid-epoch" in reason and "checkpoint6.pt" in reason


def test_epoch_collisions_fall_back_to_step() -> None:
    names = ["epoch=1-step=100.ckpt", "epoch=1-step=200.ckpt", "epoch=2-step=300.ckpt", "epoch=0-step=50.ckpt"]
    plan = make_plan(candidates(names), SelectOptions())
    assert plan.by == "step"
    assert selected_names(plan) == [
        "epoch=0-step=50.ckpt", "epoch=1-step=100.ckpt", "epoch=1-step=200.ckpt", "epoch=2-step=300.ckpt",
    ]  # fmt: skip
    plan = make_plan(candidates(names), SelectOptions(start=150))
    assert selected_names(plan) == ["epoch=1-step=200.ckpt", "epoch=2-step=300.ckpt"]


def test_missing_epoch_falls_back_to_step() -> None:
    names = ["epoch=1-step=100.ckpt", "step=200.ckpt"]
    plan = make_plan(candidates(names), SelectOptions())
    assert plan.by == "step"
    assert selected_names(plan) == names


def test_by_step_overrides_unique_epochs() -> None:
    names = ["epoch=2-step=10.ckpt", "epoch=1-step=30.ckpt"]
    assert selected_names(make_plan(candidates(names), SelectOptions())) == names[::-1]
    assert selected_names(make_plan(candidates(names), SelectOptions(by="step"))) == names


def test_collisions_on_both_indices_name_the_files() -> None:
    names = ["a-epoch=3-step=30.ckpt", "b-epoch=3-step=30.ckpt", "epoch=4-step=40.ckpt"]
    with pytest.raises(SelectionError) as caught:
        make_plan(candidates(names), SelectOptions())
    message = str(caught.value)
    assert "ckpts/a-epoch=3-step=30.ckpt" in message and "ckpts/b-epoch=3-step=30.ckpt" in message
    assert "--by" in message and "--glob" in message


def test_collision_under_explicit_by_is_an_error() -> None:
    names = ["epoch=1-step=100.ckpt", "epoch=1-step=200.ckpt"]
    with pytest.raises(
        SelectionError, match=r"epoch 1 is shared by ckpts/epoch=1-step=100\.ckpt and ckpts/epoch=1-step=200\.ckpt"
    ):
        make_plan(candidates(names), SelectOptions(by="epoch"))


def test_found_files_without_index_are_all_averaged_in_discovery_order() -> None:
    # Discovery lists a directory or a glob in natural order; with no option that needs an
    # order, every candidate is averaged (the mean does not depend on it).
    plan = make_plan(candidates(["a.pt", "b.pt"], explicit=False), SelectOptions())
    assert plan.by == "order"
    assert selected_names(plan) == ["a.pt", "b.pt"]
    assert describe_order(plan) == "in natural order of their names (no epoch or step)"
    mixed = candidates(["a.pt", "b.pt"], explicit=False) + candidates(["c.pt"], explicit=True)
    assert describe_order(make_plan(mixed, SelectOptions())) == (
        "files named one by one in the order given, those found in a directory or glob in natural order"
    )


@pytest.mark.parametrize(
    ("options", "named"),
    [
        (SelectOptions(last=3), "--last"),
        (SelectOptions(start=5), "--start"),
        (SelectOptions(end=5), "--end"),
        (SelectOptions(start=0.5), "--start"),
    ],
)
def test_found_files_without_index_refuse_options_that_need_an_order(options: SelectOptions, named: str) -> None:
    # Issue 11: twelve accelerate-style names from a glob; `--last 3` took checkpoint_7..9 by string order.
    names = [f"weights_{k}.safetensors" for k in range(12)]
    names = [n for n in names if parse_name(n).epoch is None]
    with pytest.raises(SelectionError, match=rf"^{named} needs an order, but ckpts/weights_0\.safetensors"):
        make_plan(candidates(names, explicit=False), options)


def test_accelerate_save_counts_order_the_checkpoints_numerically() -> None:
    refs = []
    for order, k in enumerate(sorted(range(12), key=str)):  # string order: 0, 1, 10, 11, 2, ...
        name = f"checkpoint_{k}"
        ref = CheckpointRef(f"ckpts/{name}", (f"ckpts/{name}/model.safetensors",), True, False, order, 1,
                            parse_name(name, is_directory=True))  # fmt: skip
        refs.append(Candidate(ref, None, None))
    plan = make_plan(refs, SelectOptions(last=3))
    assert plan.by == "save"
    assert selected_names(plan) == ["checkpoint_9", "checkpoint_10", "checkpoint_11"]


def test_explicit_files_without_index_keep_command_line_order() -> None:
    names = ["zeta.pt", "alpha.pt", "mid.safetensors"]
    plan = make_plan(candidates(names, explicit=True), SelectOptions())
    assert plan.by == "order"
    assert selected_names(plan) == names
    assert describe_order(plan) == "in the order given on the command line (no epoch or step)"
    assert selected_names(make_plan(candidates(names, explicit=True), SelectOptions(last=2))) == names[1:]


def test_nothing_selected_lists_every_candidate_and_why() -> None:
    names = ["epoch=0.ckpt", "epoch=1.ckpt", "epoch=2.ckpt", "last.ckpt"]
    with pytest.raises(SelectionError) as caught:
        make_plan(candidates(names, contents={"last.ckpt": (2, 3)}), SelectOptions(start=5))
    error = caught.value
    assert str(error).startswith("nothing selected")
    table = error.plan_table
    for name in names:
        assert f"ckpts/{name}" in table
    lines = {line.split()[1]: line for line in table.splitlines()[1:]}
    assert "--start 5" in lines["ckpts/epoch=0.ckpt"]
    assert "alias" in lines["ckpts/last.ckpt"]


def test_no_candidates_at_all() -> None:
    with pytest.raises(SelectionError, match="no checkpoints found"):
        make_plan([], SelectOptions())


def test_every_candidate_is_in_the_plan_once() -> None:
    names = [*EPOCHS, "last.ckpt", "checkpoint_best.pt"]
    plan = make_plan(candidates(names, contents={"last.ckpt": (11, 0)}), SelectOptions(start=3, end=9, last=4))
    assert sorted(c.candidate.ref.display for c in plan.entries) == sorted(f"ckpts/{n}" for n in names)
    assert selected_names(plan) == [f"epoch={k}.ckpt" for k in range(6, 10)]
    assert all(e.reason for e in plan.entries if not e.selected)


def test_a_single_unindexed_found_file_needs_no_order() -> None:
    plan = make_plan(candidates(["weights.safetensors"], explicit=False), SelectOptions(last=3))
    assert selected_names(plan) == ["weights.safetensors"]
