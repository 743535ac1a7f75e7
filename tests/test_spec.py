"""The run spec and the command-line layer (issue 17 items 1-3, issue 15 item 5): one frozen spec per script
family built from the flags, hashed over the fields it marks result-changing; flags parsed without torch;
everything the config, tokenizer and text can tell is refused before the weights load."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT

import hessian_diagonal
import hessian_spectrum
import single_layer_single_block
from lib import commands
from lib.app import cli, pipeline, reproduce
from lib.app.spec import (
    OPERATIONAL,
    RESULT,
    ROLE,
    SECTION,
    SPECS,
    DiagonalSpec,
    ExactSpec,
    SpectrumSpec,
    spec_class,
)
from lib.errors import ParamError, UserError
from lib.model.models import EMBEDDED_MODEL_DIR

FAST = ["--seqlen", "16", "--b", "2", "--no_progress"]


def _fields(cls):
    """``{field name: (section name, dataclasses.Field)}`` of a spec class."""
    out = {}
    for sec in dataclasses.fields(cls):
        if sec.metadata.get(ROLE) == SECTION:
            for f in dataclasses.fields(sec.default_factory):
                assert f.name not in out, f"{cls.__name__}: field {f.name} in two sections"
                out[f.name] = (sec.name, f)
    return out


# ----------------------------------------------------------------------------- the spec


@pytest.mark.parametrize("cls", SPECS.values(), ids=lambda c: c.__name__)
def test_every_field_is_marked_result_or_operational(cls):
    fields = _fields(cls)
    assert {s for s, _ in fields.values()} == {
        "model",
        "data",
        "subset",
        "compute",
        "output",
        "run",
    }
    for name, (_, f) in fields.items():
        assert f.metadata.get(ROLE) in (RESULT, OPERATIONAL), name


@pytest.mark.parametrize("script", commands.COMMANDS)
def test_every_flag_is_a_spec_field_with_the_same_default(script):
    """A flag without a field would be silently left out of the spec, the JSON and the hash."""
    cls = spec_class(script)
    dests = {a.dest: a for a in commands.COMMANDS[script].parser()._actions if a.dest != "help"}
    assert set(dests) <= set(_fields(cls)), set(dests) - set(_fields(cls))
    raw, built = (
        cls(script=script),
        cls.build(script),
    )  # the fields' defaults, and those resolved for the script
    for dest, action in dests.items():
        if action.default is not None and action.default is not argparse.SUPPRESS:
            assert action.default in (raw.get(dest), built.get(dest)), dest


def _changed(value):
    """A different value of the same kind."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 3
    if isinstance(value, str):
        return value + "x"
    if isinstance(value, tuple):
        return (*value, value[0]) if value else ("x",)
    return 5  # None: any value


@pytest.mark.parametrize("cls", SPECS.values(), ids=lambda c: c.__name__)
def test_the_digest_changes_with_exactly_the_result_changing_fields(cls):
    spec = (  # finite differences, --fd_step auto (the audit's flags) and --compare: the fields hashed only with them
        cls.build(cls.scripts[0], compare=("ggn",), hvp="finite_difference", fd_step="auto")
        if cls is ExactSpec
        else cls.build(cls.scripts[0], hvp="finite_difference", fd_step="auto")
    )
    for name, (_, f) in _fields(cls).items():
        other = spec.replace(**{name: _changed(spec.get(name))})
        assert (other.digest() != spec.digest()) == (f.metadata[ROLE] == RESULT), name
        assert other.as_dict() != spec.as_dict(), name  # the JSON holds every field


def test_operational_flags_do_not_change_the_name_and_the_seed_of_an_exact_hessian_only_with_compare():
    base = ExactSpec.build("single_layer_single_block")
    for change in (
        {"chunk": 4},
        {"devices": "cpu,cpu"},
        {"cache_dir": "elsewhere"},
        {"checkpoint_every": "0"},
        {"seed": 7},
    ):
        assert base.replace(**change).digest() == base.digest(), change
    compare = base.replace(compare=("ggn",))
    assert compare.replace(seed=7).digest() != compare.digest()
    spectrum = SpectrumSpec.build("hessian_spectrum")
    assert (
        spectrum.replace(keep_graphs="on").digest() == spectrum.digest()
    )  # bitwise-identical products: operational


def test_the_spec_is_frozen_built_once_and_the_namespace_is_not_changed():
    parser = commands.single_layer_several_blocks.parser()
    args = parser.parse_args(["--model", "embedded"])
    before = dict(vars(args))
    spec = cli.spec_from_args("single_layer_several_blocks", args)
    assert vars(args) == before  # defaults resolved in the spec, not in the Namespace
    assert (spec.subset.t, spec.data.seqlen, spec.data.b, spec.data.dataset) == (
        32,
        128,
        16,
        "embedded",
    )
    assert (
        spec.subset.num_blocks is None and spec.subset.block_index is None
    )  # every block, fixed once the model is known
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.data.b = 3  # type: ignore[misc]
    paper = commands.single_layer_several_blocks.spec(["--model", "facebook/opt-125m"])
    assert (paper.subset.t, paper.data.seqlen, paper.data.b, paper.data.dataset) == (
        150,
        None,
        None,
        "wikitext2",
    )
    assert spec.replace(b=4).data.b == 4 and spec.data.b == 16


def test_values_are_refused_in_one_place_naming_the_flags():
    with pytest.raises(UserError, match="^--top_k must be at least 1, got 0$"):
        SpectrumSpec.build("hessian_spectrum", top_k=0).validate()
    with pytest.raises(UserError, match="^--model_input_bs 2 does not divide --b 3$"):
        DiagonalSpec.build(b=3, model_input_bs=2).validate()
    with pytest.raises(UserError, match="--estimator nope is unknown"):
        DiagonalSpec.build(estimator=("nope",)).validate()
    assert DiagonalSpec.build(track_rows=1).compute.estimator == ("hutchinson", "xdiag")


def test_the_torch_free_constants_are_the_library_modules_own():
    """--help reads the named choices and limits from lib.constants (no torch, no source parsing); every module that
    uses one holds the same value."""
    from lib import constants

    for module, name, const in (
        ("hessian.exact", "METHODS", "METHODS"),
        ("spectrum.algorithms", "WHICH", "WHICH"),
        ("spectrum.algorithms", "MAX_DENSITY_POINTS", "MAX_DENSITY_POINTS"),
        ("runtime.checkpoint", "DEFAULT_EVERY", "DEFAULT_CHECKPOINT_EVERY"),
        ("model.data", "WIKITEXT2", "WIKITEXT2"),
        ("app.early_checks", "WIKITEXT2", "WIKITEXT2"),
        ("hessian.batch_study", "DENSE_UPTO", "BATCH_STUDY_DENSE_UPTO"),
        ("hessian.batch_study", "N_LOG", "BATCH_STUDY_N_LOG"),
    ):
        assert getattr(importlib.import_module(f"lib.{module}"), name) == getattr(constants, const)
    assert DiagonalSpec.build().run.checkpoint_every == constants.DEFAULT_CHECKPOINT_EVERY
    assert not hasattr(
        importlib.import_module("lib.app.spec"), "library_constant"
    )  # no source reading left


# ----------------------------------------------------------------------------- names and aliases


def test_deprecated_flags_still_work_with_one_warning_line(capsys):
    spec = commands.hessian_diagonal.spec(["--probe_batch", "4", "--vhp_samples", "6"])
    assert (spec.compute.chunk, spec.compute.hvps) == (4, 6)
    assert capsys.readouterr().err.splitlines() == [
        "warning: --probe_batch is deprecated; use --chunk (same meaning)",
        "warning: --vhp_samples is deprecated; use --hvps (same meaning)",
    ]
    assert (
        commands.hessian_diagonal.spec(["--chunk", "4", "--hvps", "6"]) == spec
        and not capsys.readouterr().err
    )


def test_estimator_choices_come_from_the_library_and_fisher_is_an_alias_of_empirical_fisher(capsys):
    import lib.hessian.diagonal

    assert sorted(cli.estimator_choices()[: len(lib.hessian.diagonal.ESTIMATORS)]) == sorted(
        lib.hessian.diagonal.ESTIMATORS
    )
    renamed = ("xdiag", "hutchinson", "empirical_fisher", "ggn", "exact")
    assert cli.resolve_estimators(["hutchinson", "fisher"], renamed) == [
        "hutchinson",
        "empirical_fisher",
    ]
    assert (
        capsys.readouterr().err
        == "warning: --estimator fisher is deprecated: it is the empirical Fisher, now called empirical_fisher "
        "('fisher' is the sampled Fisher of --compare)\n"
    )
    assert (
        cli.resolve_estimators(["fisher"], ("fisher", "xdiag")) == ["fisher"]
        and not capsys.readouterr().err
    )


def test_library_errors_name_parameters_and_the_scripts_name_flags():
    e = ParamError("num_blocks", "num_blocks 5 is out of range: the model has 4 blocks (use 1..4)")
    assert isinstance(e, ValueError) and isinstance(e, UserError)
    assert (
        cli.flag_message(e) == "--num_blocks 5 is out of range: the model has 4 blocks (use 1..4)"
    )
    assert (
        cli.flag_message(ParamError("t", "the row is shorter: t 9 > 8"))
        == "the row is shorter: --t 9 > 8"
    )  # whole words only
    assert cli.flag_message(ParamError("other", "other is wrong")) == "other is wrong"


# ----------------------------------------------------------------------------- reproduce builds specs


def test_reproduce_builds_specs_from_presets_that_passed_flags_override():
    args = argparse.Namespace(model="embedded", output_dir="out", quick=False)
    run = reproduce.runs("1b", "embedded")[0]
    spec = reproduce.spec_of(run, "1b", args, ["--t", "4", "--dtype", "float64"])
    assert isinstance(spec, ExactSpec) and spec.script == "several_layers_several_blocks"
    assert (spec.subset.num_blocks, spec.subset.t, spec.model.dtype, spec.output.name) == (
        1,
        4,
        "float64",
        "fig1b_embedded",
    )
    diag = reproduce.spec_of(reproduce.runs("3a", "embedded")[0], "3a", args, [])
    assert (
        isinstance(diag, DiagonalSpec) and diag.compute.hvps == 200 and diag.compute.track_rows == 1
    )


# ----------------------------------------------------------------------------- fast start, fast refusal


def test_help_and_a_malformed_flag_do_not_import_torch():
    """Parsing happens before torch, transformers or matplotlib is imported (``--help`` takes a fraction of a
    second)."""
    code = (
        "import sys, contextlib, io\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "import importlib\n"
        "for script in ('single_layer_single_block', 'hessian_diagonal', 'hessian_spectrum', 'reproduce'):\n"
        "    for argv in (['--help'], ['--no_such_flag']):\n"
        "        m = importlib.import_module(script)\n"
        "        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):\n"
        "            try:\n"
        "                (m.run if hasattr(m, 'run') else m.main)(argv)\n"
        "            except SystemExit:\n"
        "                pass\n"
        "print(sorted(m for m in ('torch', 'transformers', 'matplotlib', 'numpy') if m in sys.modules))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]", proc.stdout


@pytest.fixture(scope="module")
def no_weights_dir(tmp_path_factory):
    """A tiny OPT model directory (config and tokenizer) whose weight file is garbage: any weight load fails."""
    from transformers import OPTConfig

    path = tmp_path_factory.mktemp("model") / "opt-no-weights"
    cfg = OPTConfig(
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        ffn_dim=32,
        max_position_embeddings=64,
        word_embed_proj_dim=16,
        vocab_size=4096,
        bos_token_id=2,
        eos_token_id=2,
        pad_token_id=1,
    )
    cfg.architectures = ["OPTForCausalLM"]
    cfg.save_pretrained(path)
    (path / "model.safetensors").write_bytes(b"not a weight file")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(EMBEDDED_MODEL_DIR / f, path / f)
    return path


REFUSED_BEFORE_THE_WEIGHTS = [
    (
        single_layer_single_block,
        ["--layer_name", "q_proj"],
        (
            "error: unknown --layer_name 'q_proj'; the linear layers of a block are: self_attn.k_proj, "
            "self_attn.v_proj, self_attn.q_proj, self_attn.out_proj, fc1, fc2"
        ),
    ),
    (
        single_layer_single_block,
        ["--block_index", "2"],
        "error: --block_index 2 is out of range: the model has 2 blocks (0..1)",
    ),
    (
        single_layer_single_block,
        ["--t", "17"],
        "error: --t 17 is larger than a row of self_attn.q_proj (16 entries)",
    ),
    (
        single_layer_single_block,
        ["--seqlen", "65"],
        "error: --seqlen 65 exceeds the model's maximum sequence length 64",
    ),
    (single_layer_single_block, ["--b", "100000"], None),
    (hessian_diagonal, ["--layer_name", "fc9"], None),
    (
        hessian_diagonal,
        ["--track_rows", "17"],
        "error: --track_rows 17 is larger than the 16 output units of self_attn.q_proj",
    ),
    (hessian_spectrum, ["--params", "model.nope.*"], None),
    (
        hessian_spectrum,
        ["--top_k", "9", "--t", "8"],
        "error: --top_k 9 with --which largest asks for 9 eigenvalues but the subset has only 8 entries",
    ),
]


def _on(model_dir, tmp_path, script=single_layer_single_block) -> list[str]:
    """Flags of a small run of ``script`` on ``model_dir`` (the diagonal script has no ``--t``)."""
    t = [] if script is hessian_diagonal else ["--t", "4"]
    return [
        "--model",
        str(model_dir),
        "--dataset",
        "embedded",
        *t,
        *FAST,
        "--output_dir",
        str(tmp_path),
    ]


@pytest.mark.parametrize(
    "script,extra,message",
    REFUSED_BEFORE_THE_WEIGHTS,
    ids=[f"{s.__name__}{' '.join(e)}" for s, e, _ in REFUSED_BEFORE_THE_WEIGHTS],
)
def test_checks_that_need_only_config_tokenizer_and_text_come_before_the_weights(
    script, extra, message, no_weights_dir, tmp_path, capsys
):
    with pytest.raises(SystemExit) as exc:
        cli.main(script.run, [*_on(no_weights_dir, tmp_path, script), *extra])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        len(err) == 1 and "SafetensorError" not in err[0] and "cannot load model" not in err[0]
    ), err
    assert err[0] == message if message else (err[0].startswith("error: ") and " --" in err[0]), err


def test_the_weights_are_read_after_those_checks(no_weights_dir, tmp_path, capsys):
    """The same directory with valid flags: the corrupt weight file is what stops the run."""
    with pytest.raises(SystemExit):
        cli.main(single_layer_single_block.run, _on(no_weights_dir, tmp_path))
    assert f"error: cannot load model directory {no_weights_dir} (" in capsys.readouterr().err


def test_token_ids_beyond_the_vocabulary_are_refused_before_the_weights(tmp_path, capsys):
    from transformers import OPTConfig

    path = tmp_path / "small-vocab"
    OPTConfig(
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        ffn_dim=32,
        max_position_embeddings=64,
        word_embed_proj_dim=16,
        vocab_size=64,
    ).save_pretrained(path)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(EMBEDDED_MODEL_DIR / f, path / f)
    with pytest.raises(SystemExit):
        cli.main(single_layer_single_block.run, _on(path, tmp_path / "o"))
    err = capsys.readouterr().err.strip()
    assert err.startswith(
        f"error: the tokenizer of {str(path)!r} gives token id "
    ) and err.endswith(
        "but the model's vocabulary has 64 entries (ids 0..63): the tokenizer does not belong to the model"
    ), err


# ----------------------------------------------------------------------------- the pipeline


def test_the_json_holds_the_whole_resolved_spec_and_results_go_to_stdout(tmp_path, capsys):
    argv = ["--t", "4", "--top_k", "2", *FAST, "--output_dir", str(tmp_path), "--name", "s"]
    meta = hessian_spectrum.run(argv)
    config = json.loads((tmp_path / "s.json").read_text())["config"]
    spec = commands.hessian_spectrum.spec(argv)
    assert config == meta["config"] == spec.as_dict()
    assert (
        SpectrumSpec.build(
            "hessian_spectrum",
            **{
                k: v
                for s in ("model", "data", "subset", "compute", "output", "run")
                for k, v in config[s].items()
            },
        )
        == spec
    )
    out, err = capsys.readouterr()
    assert (
        out.splitlines()[-1].startswith(f"wrote {tmp_path / 's.pt'}") and "wrote" not in err
    )  # every script: results and files on stdout


def test_a_resume_with_another_result_changing_flag_is_refused(tmp_path, capsys):
    """The checkpoint identity includes the spec's result-changing fields: here the same text under
    another --dataset name."""
    text = tmp_path / "same.txt"
    shutil.copy(ROOT / "assets" / "shakespeare-heldout.txt", text)
    argv = [
        "--t",
        "3",
        *FAST,
        "--output_dir",
        str(tmp_path),
        "--name",
        "h",
        "--keep_checkpoint",
        "--checkpoint_every",
        "1",
    ]
    single_layer_single_block.run(argv)
    with pytest.raises(SystemExit) as exc:
        cli.main(
            single_layer_single_block.run,
            [*argv, "--resume", "--overwrite", "--dataset", str(text)],
        )
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (
        f"error: checkpoint {tmp_path / 'h.ckpt'} was written by a run with a different configuration "
        f"(differs in: dataset); rerun with the original flags, or delete it to start over"
    ), err


def test_pipeline_turns_a_parameter_error_into_the_flag(monkeypatch, tmp_path):
    def failing(*a, **k):
        raise ParamError(
            "vhp_samples",
            "the XDiag sketch has rank below 2: the Hessian's rank is smaller than vhp_samples/2",
        )

    monkeypatch.setattr("lib.app.diagonal_family.hessian_diagonal", failing)
    with pytest.raises(UserError) as exc:
        hessian_diagonal.run(["--hvps", "4", *FAST, "--output_dir", str(tmp_path)])
    assert (
        str(exc.value)
        == "the XDiag sketch has rank below 2: the Hessian's rank is smaller than --hvps/2"
    )
    assert not isinstance(exc.value, ParamError)
    assert pipeline.written_files({"files": {"a": "x.pt"}, "figures": ["x.png"]}) == [
        "x.pt",
        "x.png",
    ]


def test_the_console_entry_points_are_the_scripts(tmp_path):
    """Each entry point of pyproject.toml names a command of lib.commands (or reproduce's main)."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    targets = {v.split(":", 1)[1] for v in scripts.values()}
    assert targets == {f"{s}.main" for s in commands.COMMANDS} | {"main"}
    assert all(v.startswith("llm_hessian.") for v in scripts.values())
    env = {**os.environ, "PYTHONPATH": ""}
    out = subprocess.run(
        [sys.executable, str(ROOT / "hessian_spectrum.py"), "--help"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=60,
    )
    assert out.returncode == 0 and out.stdout.startswith("usage: hessian_spectrum.py")
