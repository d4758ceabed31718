"""The `janusvl` command line, end to end in subprocesses (as a user runs it) and in-process for
the argument checks, which must fail before any model is loaded."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import make_image
from janusvl import Janus
from janusvl.cli import main
from janusvl.cli.demo import DEFAULT_PROMPT, demo_image
from janusvl.testing.checkpoint import write_checkpoint


def janusvl(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONIOENCODING": "utf-8", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "janusvl", *args], input=None if stdin is None else stdin.encode(),
                          capture_output=True, env=env, timeout=300)
    proc.stdout, proc.stderr = proc.stdout.decode("utf-8"), proc.stderr.decode("utf-8")
    return proc


@pytest.fixture(scope="module")
def image_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cli") / "picture.png"
    make_image(120, 80, seed=31).save(path)
    return path


def image_message(text: str, path: Path) -> dict:
    return {"role": "user", "content": [{"type": "image", "image": str(path)}, {"type": "text", "text": text}]}


def test_one_shot_streams_the_api_answer(janus, tiny_dir, image_path) -> None:
    proc = janusvl("chat", str(tiny_dir), "--image", str(image_path), "Describe this image.", "--max-new-tokens", "8")
    assert proc.returncode == 0, proc.stderr
    want = janus.chat([image_message("Describe this image.", image_path)], max_new_tokens=8).text
    assert proc.stdout == want + "\n"
    assert "Loading" in proc.stderr and "Traceback" not in proc.stderr


def test_interactive_session_over_a_pipe(janus, tiny_dir, image_path) -> None:
    session = f"What is this?\n/image {image_path}\nDescribe it.\n/quit\nnever sent\n"
    proc = janusvl("chat", str(tiny_dir), "--max-new-tokens", "6", stdin=session)
    assert proc.returncode == 0, proc.stderr
    first = {"role": "user", "content": [{"type": "text", "text": "What is this?"}]}
    one = janus.chat([first], max_new_tokens=6).text
    second = image_message("Describe it.", image_path)
    two = janus.chat([first, {"role": "assistant", "content": one}, second], max_new_tokens=6).text
    assert proc.stdout == f"{one}\n{two}\n"
    assert f"image {image_path} attached" in proc.stderr


def test_bad_model_path_fails_with_one_line(tmp_path) -> None:
    missing = tmp_path / "no-such-model"
    proc = janusvl("chat", str(missing), "hi")
    assert proc.returncode == 1 and proc.stdout == ""
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and str(missing) in errors[0] and "Traceback" not in proc.stderr


def test_demo_without_a_model_answers_about_the_demo_picture(tmp_path) -> None:
    proc = janusvl("demo", "--max-new-tokens", "6")
    assert proc.returncode == 0, proc.stderr
    assert "RANDOM weights" in proc.stderr and "gibberish" in proc.stderr
    # the same random checkpoint, asked the same question about the same picture
    janus = Janus.from_pretrained(write_checkpoint(tmp_path / "tiny", dtype=torch.float32), device="cpu")
    message = {"role": "user", "content": [{"type": "image", "image": demo_image()},
                                           {"type": "text", "text": DEFAULT_PROMPT}]}
    assert proc.stdout == janus.chat([message], max_new_tokens=6).text + "\n"


# --- failures caught before loading, in-process ------------------------------------------------

@pytest.mark.parametrize("args,message", [
    (["--image", "{missing}", "hi"], "{missing}: no such image file"),
    (["--image", "{broken}", "hi"], "{broken}: not a readable image"),
    (["--max-new-tokens", "0", "hi"], "--max-new-tokens must be >= 1"),
    (["--temperature", "-1", "hi"], "temperature must be a finite number >= 0"),
    (["--top-p", "0", "hi"], "top_p must be in (0, 1]"),
    (["--device", "nonsense", "hi"], "--device 'nonsense': not a device name"),
])
def test_bad_arguments_fail_before_loading(tmp_path, capsys, args: list[str], message: str) -> None:
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    paths = {"missing": tmp_path / "missing.png", "broken": broken}
    args = [a.format(**paths) for a in args]
    status = main(["chat", str(tmp_path / "never-loaded"), *args])
    err = capsys.readouterr().err
    assert status == 1 and "Loading" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"janusvl chat: error: {message.format(**paths)}")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without CUDA")
def test_missing_cuda_is_a_clear_error(tmp_path, capsys) -> None:
    assert main(["chat", str(tmp_path), "--device", "cuda", "hi"]) == 1
    assert "CUDA is not available" in capsys.readouterr().err


def test_usage_errors_and_help(capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["chat"])
    assert exit_.value.code == 2 and "MODEL" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["chat", "--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0
    assert all(cmd in out for cmd in ("/image PATH", "/reset", "/quit", "--max-new-tokens", "--seed"))
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert all(name in out for name in ("chat", "demo"))


def test_bad_image_in_a_session_is_reported_and_the_session_goes_on(janus, capsys, tmp_path) -> None:
    import io

    from janusvl.cli.chat import Session

    missing = tmp_path / "gone.png"
    session = Session(janus, [], [], {"max_new_tokens": 3})
    status = session.run(io.StringIO(f"/image {missing}\n/bogus\nHi\n"))
    out, err = capsys.readouterr()
    assert status == 1 and f"{missing}: no such image file" in err and "unknown command '/bogus'" in err
    assert out == janus.chat("Hi", max_new_tokens=3).text + "\n"
    assert [m["role"] for m in session.history] == ["user", "assistant"]
