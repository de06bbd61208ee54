"""Every command through the CLI: a success case and a failure case each."""

import json
import subprocess
import sys

import pytest

from conftest import TINY, run_cli


@pytest.fixture
def trained(corpus):
    r = run_cli("train", corpus, *TINY, "--steps", "30", "--eval-every", "10", "--run", "checkpoints/demo")
    assert r.exit_code == 0, r.stderr
    return corpus


def test_help_lists_commands():
    r = subprocess.run([sys.executable, "-m", "charrnn", "--help"], capture_output=True, text=True)
    assert r.returncode == 0
    for cmd in ("train", "sample", "eval", "checkpoints"):
        assert cmd in r.stdout


def test_version():
    r = run_cli("--version")
    assert r.exit_code == 0 and r.stdout.startswith("charrnn ")


def test_train_writes_a_run(trained, tmp_path):
    run = tmp_path / "checkpoints" / "demo"
    assert (run / "metrics.jsonl").exists()
    assert list(run.glob("step_*.safetensors"))


def test_train_default_run_folder_under_checkpoints(corpus, tmp_path):
    r = run_cli("train", corpus, *TINY, "--steps", "3")
    assert r.exit_code == 0, r.stderr
    runs = list((tmp_path / "checkpoints").iterdir())
    assert len(runs) == 1 and runs[0].name.startswith("corpus-lstm-1x32-")


@pytest.mark.parametrize("args,code,fragment", [
    (["missing.txt"], 1, "not found"),
    (["{corpus}", "--cell", "transformer"], 2, "transformer"),
    (["{corpus}", "--hidden", "0"], 2, "hidden"),
    (["{corpus}", "--steps", "5", "--epochs", "1"], 2, "at most one"),
    (["{corpus}", "--time", "soon"], 2, "duration"),
    (["--resume", "nowhere"], 1, "no run folder"),
    ([], 2, "name a corpus"),
])
def test_train_errors(corpus, tmp_path, args, code, fragment):
    args = [a.replace("{corpus}", str(corpus)) for a in args]
    r = run_cli("train", *args, "-q")
    assert r.exit_code == code
    assert fragment in r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())


def test_train_refuses_to_overwrite_a_run(trained):
    r = run_cli("train", trained, *TINY, "--steps", "3", "--run", "checkpoints/demo")
    assert r.exit_code == 1 and "already holds a run" in r.stderr


def test_sample_default_latest_run(trained):
    r = run_cli("sample", "--length", "50", "--seed", "3", "--prime", "The")
    assert r.exit_code == 0, r.stderr
    assert r.stdout.startswith("The") and len(r.stdout.rstrip("\n")) == 53
    again = run_cli("sample", "--length", "50", "--seed", "3", "--prime", "The")
    assert again.stdout == r.stdout


def test_sample_jsonl_num_and_unknown_prime(trained):
    r = run_cli("sample", "checkpoints/demo", "--num", "3", "--jsonl", "--length", "20", "--prime", "Th€", "--temp", "0.8")
    assert r.exit_code == 0
    rows = [json.loads(l) for l in r.stdout.splitlines()]
    assert len(rows) == 3 and all(row["text"].startswith("Th") and len(row["text"]) == 22 for row in rows)
    assert "€" in r.stderr and "skipped" in r.stderr


def test_sample_greedy_and_filters(trained):
    a = run_cli("sample", "--temp", "0", "--length", "30", "--seed", "1")
    b = run_cli("sample", "--temperature", "0", "--length", "30", "--seed", "2")
    assert a.exit_code == 0 and a.stdout == b.stdout
    c = run_cli("sample", "--top-k", "3", "--top-p", "0.9", "--length", "30")
    assert c.exit_code == 0


@pytest.mark.parametrize("args,code,fragment", [
    (["--temp", "-1"], 2, "--temp"),
    (["--top-p", "1.5"], 2, "--top-p"),
    (["--top-k", "-2"], 2, "--top-k"),
    (["nowhere.pt"], 1, "no checkpoint"),
])
def test_sample_errors(trained, args, code, fragment):
    r = run_cli("sample", *args)
    assert r.exit_code == code and fragment in r.stderr and "Traceback" not in r.stderr


def test_sample_without_any_run():
    r = run_cli("sample")
    assert r.exit_code == 1 and "no checkpoints found" in r.stderr and "charrnn train" in r.stderr


def test_eval_json(trained):
    r = run_cli("eval", "checkpoints/demo", trained, "--json")
    assert r.exit_code == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["chars"] > 1000 and abs(out["bpc"] - out["loss"] / 0.6931471805599453) < 1e-9


def test_eval_and_sample_in_bf16(trained):
    fp32 = json.loads(run_cli("eval", "checkpoints/demo", trained, "--json").stdout)["loss"]
    r = run_cli("eval", "checkpoints/demo", trained, "--json", "--precision", "bf16")
    assert r.exit_code == 0, r.stderr
    assert abs(json.loads(r.stdout)["loss"] - fp32) < 0.02  # bf16 weights and states cost almost nothing
    r = run_cli("sample", "checkpoints/demo", "--precision", "bf16", "--length", "50", "--seed", "1", "--num", "3", "--jsonl")
    assert r.exit_code == 0 and len(r.stdout.splitlines()) == 3
    r = run_cli("sample", "checkpoints/demo", "--precision", "fp8")
    assert r.exit_code == 2 and "fp8" in r.stderr


def test_eval_unknown_characters(trained, tmp_path):
    other = tmp_path / "other.txt"
    other.write_text("ünïcödé text " * 20)
    r = run_cli("eval", "checkpoints/demo", other)
    assert r.exit_code == 1 and "vocabulary" in r.stderr


def test_checkpoints_list_show_prune(trained, corpus):
    r = run_cli("train", corpus, *TINY, "--steps", "30", "--eval-every", "10", "--keep", "5", "--run", "checkpoints/many")
    assert r.exit_code == 0
    lst = run_cli("checkpoints", "list", "--json")
    rows = [json.loads(l) for l in lst.stdout.splitlines()]
    assert {row["run"].split("/")[-1] for row in rows} == {"demo", "many"}
    assert run_cli("checkpoints", "list").exit_code == 0
    show = run_cli("checkpoints", "show", "checkpoints/many", "--json")
    assert show.exit_code == 0 and json.loads(show.stdout)["model"]["hidden"] == 32
    assert run_cli("checkpoints", "show", "checkpoints/many").exit_code == 0
    from charrnn.checkpoint import list_checkpoints

    before = list_checkpoints("checkpoints/many")
    assert len(before) == 3
    pr = run_cli("checkpoints", "prune")
    assert pr.exit_code == 0 and "deleted" in pr.stderr
    after = list_checkpoints("checkpoints/many")
    best = min(before, key=lambda i: i.val_loss)
    assert {i.path for i in after} == {best.path, before[-1].path}


def test_checkpoints_errors(tmp_path):
    assert run_cli("checkpoints", "list", "--dir", "nowhere").exit_code == 1
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    r = run_cli("checkpoints", "show", bad)
    assert r.exit_code == 1 and "not a charrnn checkpoint" in r.stderr
    assert run_cli("checkpoints", "prune", "--dir", "nowhere").exit_code == 1


def test_checkpoints_library_functions_return_what_the_commands_print(trained):
    """The checkpoints commands only render: runs.run_rows / checkpoint_details are the --json output, and
    the table of `checkpoints show RUN` marks the best and the latest file that runs.checkpoint_files found."""
    from pathlib import Path

    from charrnn import runs

    rows = runs.run_rows(Path("checkpoints"))
    assert [json.loads(l) for l in run_cli("checkpoints", "list", "--json").stdout.splitlines()] == rows
    details = runs.checkpoint_details(Path("checkpoints/demo"))
    shown = run_cli("checkpoints", "show", "checkpoints/demo", "--json")
    assert json.loads(shown.stdout) == json.loads(json.dumps(details, default=str))
    assert details["step"] == rows[0]["last_step"] or details["checkpoint"] == rows[0]["best_path"]
    files = runs.checkpoint_files(Path("checkpoints/demo"))
    assert files[-1]["mark"] in ("latest", "best") and any(f["mark"] == "best" for f in files)
    card = run_cli("checkpoints", "show", "checkpoints/demo")
    assert card.exit_code == 0
    for fragment in (details["checkpoint"], f"{details['step']} of {details['total_steps']}", "M params",
                     f"{details['vocab_size']} characters", *(f["file"] for f in files)):
        assert fragment in card.stderr


def test_help_does_not_import_torch():
    """`charrnn --help` starts fast: the app and every command module load without torch."""
    code = ("import atexit, sys; atexit.register(lambda: print('torch' in sys.modules, file=sys.stderr)); "
            "sys.argv = ['charrnn', '--help']; from charrnn.cli import main; main()")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and "checkpoints" in r.stdout
    assert r.stderr.strip().splitlines()[-1] == "False"


def test_shell_completion(tmp_path):
    """Typer's completion is on: the script installs for a shell, and it completes sub-commands and choices."""
    import os
    from pathlib import Path

    exe = str(Path(sys.executable).parent / "charrnn")
    # as a user types it in bash: Typer finds the shell among the command's parent processes (shellingham),
    # so a test run whose own parents include no shell (a detached CI job) would get "Shell  not supported".
    # A second command keeps bash from exec'ing charrnn in its place, so bash stays its parent.
    r = subprocess.run(["bash", "-c", f'"{exe}" --show-completion; status=$?; exit $status'], capture_output=True, text=True)
    assert r.returncode == 0 and "_CHARRNN_COMPLETE" in r.stdout

    def complete(line: str) -> list[str]:
        words = line.split(" ")
        env = {**os.environ, "_CHARRNN_COMPLETE": "complete_bash", "COMP_WORDS": line,
               "COMP_CWORD": str(len(words) - 1)}
        done = subprocess.run([exe], capture_output=True, text=True, env=env)
        assert done.returncode == 0, done.stderr
        return done.stdout.split()

    assert set(complete("charrnn checkpoints ")) >= {"list", "show", "prune"}
    assert set(complete("charrnn train --cell ")) == {"lstm", "gru", "rnn", "peephole", "coupled", "mlstm"}
