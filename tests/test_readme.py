"""Every command README.md shows that can run here is run here, as written.

Each ```sh or ```python block in the README is preceded by a tag: `<!-- readme-test: NAME -->` puts
it in the story NAME, `<!-- readme-test: skip (why) -->` says why it cannot run here (a GPU, the
hub, an install). A story's blocks run in README order as one bash script, in a fresh home folder
(so `~` paths, identities and caches start empty), the way a reader following along in one shell
would run them; python blocks run through `python -` inside that script. An untagged block fails
the test, so a new README command cannot slip past it."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
TAG_RE = re.compile(r"<!--\s*readme-test:\s*(?P<tag>[\w-]+)\s*(?P<why>\(.*\))?\s*-->")
BLOCK_RE = re.compile(r"^```(?P<lang>\w*)\n(?P<body>.*?)^```", re.MULTILINE | re.DOTALL)


def readme_blocks() -> list[tuple[str, str, str]]:
    """(tag, language, body) of every code block, in README order."""
    text = README.read_text()
    blocks = []
    for match in BLOCK_RE.finditer(text):
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        tag = TAG_RE.fullmatch(before.strip())
        blocks.append((tag.group("tag") if tag else "", match.group("lang"), match.group("body")))
    return blocks


def story_script(name: str) -> str:
    lines = ["set -euo pipefail", "cd ~"]
    for tag, lang, body in readme_blocks():
        if tag != name:
            continue
        if lang == "python":
            lines += [f"{sys.executable} - <<'HELIX_README_PYTHON'", body.rstrip("\n"), "HELIX_README_PYTHON"]
        else:
            lines.append(body.rstrip("\n"))
    return "\n".join(lines) + "\n"


def run_story(name: str, tmp_path: Path, timeout_s: float) -> subprocess.CompletedProcess:
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("HELIX_")}
    bin_dir = str(Path(sys.executable).parent)  # the venv's helix, helix-node, python first
    env.update(HOME=str(home), PATH=bin_dir + os.pathsep + env.get("PATH", ""), PYTHONUNBUFFERED="1")
    script = tmp_path / f"{name}.sh"
    script.write_text(story_script(name))
    log = tmp_path / f"{name}.log"
    with log.open("w") as out_file:
        proc = subprocess.Popen(
            ["bash", str(script)],
            cwd=home,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out_file,  # a file, not a pipe: background jobs must not keep us waiting for EOF
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its background jobs share the group, so one killpg ends them all
        )
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            pytest.fail(f"README story {name!r} did not finish in {timeout_s:g} s; its output:\n{log.read_text()[-6000:]}")
    left = _group_alive(proc.pid)
    if left:
        os.killpg(proc.pid, signal.SIGKILL)
    out = log.read_text()
    assert not left or proc.returncode != 0, f"README story {name!r} left processes running:\n{out[-3000:]}"
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, "")


def _group_alive(pgid: int) -> bool:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        time.sleep(0.2)
    return True


def test_every_block_is_tagged_run_or_skipped_with_a_reason():
    blocks = readme_blocks()
    assert len(blocks) >= 10
    untagged = [body.splitlines()[0] for tag, _, body in blocks if not tag]
    assert not untagged, f"README blocks without a readme-test tag: {untagged}"
    text = README.read_text()
    for match in TAG_RE.finditer(text):
        if match.group("tag") == "skip":
            assert match.group("why"), "a skipped README block must say why: <!-- readme-test: skip (why) -->"
    assert {tag for tag, _, _ in blocks} >= {"story", "plan", "skip"}


def test_quick_start_installs_and_tests_as_ci_runs_it():
    """CI runs the Quick start's second line; the first must run the demo after the same install."""
    quick = next(body for tag, lang, body in readme_blocks() if lang == "sh")
    first, second = quick.strip().splitlines()
    assert first.endswith("pip install -q -e . && helix demo")
    assert second.endswith("pip install -q -e '.[test]' && python -m pytest")
    assert first.split("pip install -q -e")[0] == second.split("pip install -q -e")[0]


def test_plan_and_simulate_commands_run_as_written(tmp_path):
    done = run_story("plan", tmp_path, timeout_s=600)
    assert done.returncode == 0, done.stdout[-6000:]
    assert "2045.6" in done.stdout  # the 70B plan's proven optimum, printed by `helix plan`
    assert "decode" in done.stdout.lower()  # `helix sim`'s summary
    assert (tmp_path / "home" / "plan.json").exists() and (tmp_path / "home" / "plan70b.json").exists()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_swarm_story_runs_as_written(tmp_path):
    """Make a model, host a bootstrap, join two nodes and one behind a "NAT", wait, generate through the CLI, the library
    and the OpenAI gateway, read the status page and metrics, stop; then a private swarm, in which
    a keyless command is refused; then profile the machine."""
    done = run_story("story", tmp_path, timeout_s=840)
    out = done.stdout
    assert done.returncode == 0, out[-8000:]
    assert "wrote a random llama model" in out
    assert out.count("/ip4/127.0.0.1/tcp/31337/p2p/") >= 1
    assert re.search(r"plan: epoch \d+ by", out), "helix status shows the plan"
    assert "reachable through the bootstrap's relay" in out and "/p2p-circuit/p2p/" in out, "doctor --no-listen"
    assert re.search(r"^carol\s.*\[\d+, \d+\).*\brelay\b", out, re.MULTILINE), "carol serves layers, via the relay"
    assert '"object": "text_completion"' in out or '"object":"text_completion"' in out
    assert '"nodes"' in out  # /api/state
    assert re.search(r"^helix_\w+", out, re.MULTILINE), "a node's Prometheus metrics"
    assert "refused without the key, as it should be" in out
    assert "tokens_per_s" in out  # helix profile's table
    assert "Traceback" not in out, textwrap.shorten(out[out.index("Traceback") :], 3000)
