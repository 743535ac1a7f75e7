"""What the console says to a newcomer (issue 27 items 3 and 6): flags of the other scripts, a thread count below
the CPUs with its reason, the trace with its standard error, one line per --compare approximation, and every file
written. (The rerun refusal's ways out: tests/test_early_inputs.py and tests/test_guarantees.py.)"""

from __future__ import annotations

import pytest
import torch

import single_layer_several_blocks
import single_layer_single_block
from lib.app.suggest import unknown_flags_hint
from lib.runtime import threads


def _error(script, argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        script.parser().parse_args(argv)
    assert e.value.code == 2
    return capsys.readouterr().err


def test_a_flag_of_another_script_is_named_with_the_scripts_that_have_it(capsys):
    err = _error(single_layer_single_block, ["--num_block", "2"], capsys)
    assert err.count("\n") == 1 and (
        "(--num_blocks is a flag of single_layer_several_blocks.py, several_layers_several_blocks.py, "
        "hessian_spectrum.py, not of this script)" in err
    )
    err = _error(single_layer_single_block, ["--estimatr", "xdiag"], capsys)
    assert "--estimator is a flag of hessian_diagonal.py, not of this script" in err
    # a close flag of this script comes first and alone
    err = _error(single_layer_several_blocks, ["--num_block", "2"], capsys)
    assert "did you mean --num_blocks?" in err and "not of this script" not in err
    assert "not of this script" not in _error(single_layer_single_block, ["--zzz"], capsys)


def test_the_other_scripts_are_asked_only_when_needed():
    asked = []

    def others():
        asked.append(1)
        return {"a.py": ["--num_blocks"], "b.py": ["--num_blocks", "--t"]}

    assert unknown_flags_hint("unrecognized arguments: --sed", ["--seed"], others) == (
        " (did you mean --seed?)"
    )
    assert not asked
    assert unknown_flags_hint("unrecognized arguments: --num_block=2", ["--seed"], others) == (
        " (--num_blocks is a flag of a.py, b.py, not of this script)"
    )


@pytest.mark.parametrize(
    "choice,usable,line",
    [
        (threads.Choice(2, "load 0.0 on 2 cpus: all usable"), 2, None),  # every CPU: silent
        (
            threads.Choice(1, "load 2.0 on 2 cpus"),
            2,
            "threads: 1 of 2 CPUs, because the machine is busy (load 2.0 on 2 cpus); --threads N overrides",
        ),
        (threads.Choice(1, "--threads"), 2, "threads: 1 of 2 CPUs, as --threads asks"),
        (
            threads.Choice(1, "OMP_NUM_THREADS"),
            4,
            "threads: 1 of 4 CPUs, as OMP_NUM_THREADS=1 in the environment asks (--threads N overrides it)",
        ),
        (threads.Choice(1, "load 0.0 on 2 cpus", processes=2), 2, None),  # 1 each for 2 workers
        (
            threads.Choice(1, "load 3.0 on 8 cpus", processes=2),
            8,
            "threads: 1 per process x 2 processes of 8 CPUs, because the machine is busy (load 3.0 on 8 cpus); "
            "--threads N overrides",
        ),
    ],
)
def test_the_console_line_for_fewer_threads_than_cpus(choice, usable, line):
    assert threads.console_line(choice, usable) == line


def test_a_run_on_fewer_threads_says_so_on_the_console(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(threads, "usable_cpus", lambda: 2)
    before = torch.get_num_threads()
    try:
        single_layer_single_block.run(
            ["--t", "2", "--b", "1", "--seqlen", "8", "--no_progress", "--threads", "1"]
            + ["--output_dir", str(tmp_path)]
        )
    finally:
        torch.set_num_threads(before)
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "threads: 1 of 2 CPUs, as --threads asks"
    assert sum(line.startswith("threads:") for line in out) == 1


def test_the_readme_states_quiet_machine_times_and_the_shared_machine_expectation():
    from conftest import ROOT

    text = " ".join((ROOT / "README.md").read_text().split())
    assert "about 4.5 min on 2 quiet cores" in text
    assert (
        "Every time on this page was taken on a quiet machine: on a shared one expect about 2-4x"
        in text
    )
    assert (
        "81 s for the first command, 5.5 min without the slow tests, 14 min for the whole suite"
        in text
    )


# ----------------------------------------------------------------------------- the numbers asked for (item 3)


def test_trace_and_comparison_lines_from_the_json_sections():
    from lib.app.console import comparison_lines, trace_line

    trace = {
        "hutchinson": {"estimate": 12.345, "stderr": 0.4123, "hvps": 30, "passes": 30},
        "hutch++": {"estimate": 12.1, "stderr": float("nan"), "hvps": 3, "passes": 2},
    }
    assert trace_line(trace) == (
        "trace: Hutchinson 12.345 +- 0.41 (standard error), 30 HVPs; "
        "Hutch++ 12.1 (no standard error: one probe), 3 HVPs"
    )
    assert trace_line({"exact": 0.5}) == "trace: exact 0.5"
    comparison = {
        "ggn": {"cosine": 0.9213, "rel_frobenius": 0.4, "top_k": 8, "top_k_overlap": 0.75},
        "exact": {"pred_vs_measured_corr": 0.9},  # the measured loss changes: no line
    }
    assert comparison_lines(comparison) == [
        "compare ggn: cosine 0.921, relative Frobenius error 0.400, top-8 overlap 0.750"
    ]


def _wrote(out: list[str]) -> set[str]:
    line = next(line for line in out if line.startswith("wrote "))
    return {p.rsplit("/", 1)[-1] for p in line[len("wrote ") :].split(", ")}


def test_compare_prints_one_line_per_approximation_and_wrote_lists_every_file(tmp_path, capsys):
    import json

    meta = single_layer_single_block.run(
        ["--t", "3", "--b", "2", "--seqlen", "8", "--compare", "ggn", "kfac", "--no_progress"]
        + ["--output_dir", str(tmp_path), "--name", "c"]
    )
    out = capsys.readouterr().out.splitlines()
    js = json.loads((tmp_path / meta["files"]["json"]).read_text())
    for name in ("ggn", "kfac"):
        m = js["comparison"][name]
        assert (
            f"compare {name}: cosine {m['cosine']:.3f}, relative Frobenius error {m['rel_frobenius']:.3f}, "
            f"top-{m['top_k']} overlap {m['top_k_overlap']:.3f}"
        ) in out
    written = {p.name for p in tmp_path.iterdir()}
    assert {"c_compare.pt", "c_compare.pdf", "c_compare.png"} <= written
    assert _wrote(out) == written


@pytest.mark.parametrize("exact_below", ["0", "64"], ids=["iterative", "exact"])
def test_trace_prints_the_estimates_with_their_standard_errors(exact_below, tmp_path, capsys):
    import json

    import hessian_spectrum

    meta = hessian_spectrum.run(
        ["--t", "6", "--b", "2", "--seqlen", "8", "--trace", "--trace_hvps", "4", "--top_k", "2"]
        + ["--exact_below", exact_below, "--no_progress", "--output_dir", str(tmp_path)]
    )
    out = capsys.readouterr().out.splitlines()
    trace = json.loads((tmp_path / meta["files"]["json"]).read_text())["trace"]
    line = next(line for line in out if line.startswith("trace: "))
    if exact_below == "0":
        for key, label in (("hutchinson", "Hutchinson"), ("hutch++", "Hutch++")):
            e = trace[key]
            assert (
                f"{label} {e['estimate']:.6g} +- {e['stderr']:.2g} (standard error), 4 HVPs" in line
            )
    else:
        assert line == f"trace: exact {trace['exact']:.6g}"
    assert _wrote(out) == {p.name for p in tmp_path.iterdir()}
