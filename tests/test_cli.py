"""The `janusvl` command line, end to end in subprocesses (as a user runs it) and in-process for
the argument checks, which must fail before any model is loaded."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import make_image
from janusvl import Janus
from janusvl.cli import main
from janusvl.models.quant import Int4Linear, Int8Linear
from janusvl.cli.demo import DEFAULT_PROMPT, demo_image
from janusvl.testing.checkpoint import write_checkpoint


ENV = {**os.environ, "PYTHONIOENCODING": "utf-8", "HF_HUB_OFFLINE": "1"}


def janusvl(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "janusvl", *args], input=None if stdin is None else stdin.encode(),
                          capture_output=True, env=ENV, timeout=300)
    proc.stdout, proc.stderr = proc.stdout.decode("utf-8"), proc.stderr.decode("utf-8")
    return proc


def started(*args: str) -> subprocess.Popen:
    """`janusvl ARGS` running, its stdin, stdout and stderr pipes open."""
    return subprocess.Popen([sys.executable, "-m", "janusvl", *args], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)


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


def test_system_prompt_reset_and_exit(janus, tiny_dir, image_path) -> None:
    """--system replaces the default system prompt in every turn; /reset forgets the conversation
    and the attached image; /exit leaves, so the last line is never sent."""
    session = f"What is this?\n/image {image_path}\n/reset\nDescribe it.\n/exit\nnever sent\n"
    proc = janusvl("chat", str(tiny_dir), "--system", "You are terse.", "--max-new-tokens", "6", stdin=session)
    assert proc.returncode == 0, proc.stderr
    system = {"role": "system", "content": "You are terse."}
    first = {"role": "user", "content": [{"type": "text", "text": "What is this?"}]}
    one = janus.chat([system, first], max_new_tokens=6).text
    fresh = janus.chat([system, {"role": "user", "content": "Describe it."}], max_new_tokens=6).text
    assert proc.stdout == f"{one}\n{fresh}\n"
    assert "(conversation cleared)" in proc.stderr and "error" not in proc.stderr
    # what /reset prevented, and what --system changed: both would give other answers
    kept = janus.chat([system, first, {"role": "assistant", "content": one},
                       image_message("Describe it.", image_path)], max_new_tokens=6).text
    assert fresh != kept and one != janus.chat([first], max_new_tokens=6).text


def test_version(capsys) -> None:
    """The version of the installed distribution (pyproject.toml's), which the package repeats."""
    from importlib.metadata import version

    from janusvl import __version__

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out == f"janusvl {version('janusvl')}\n"
    assert __version__ == version("janusvl")


def test_demo_with_a_model_answers_its_prompt(janus, tiny_dir) -> None:
    proc = janusvl("demo", str(tiny_dir), "--prompt", "What is here?", "--max-new-tokens", "6")
    assert proc.returncode == 0, proc.stderr
    assert "RANDOM" not in proc.stderr and "What is here?" in proc.stderr
    message = {"role": "user", "content": [{"type": "image", "image": demo_image()},
                                           {"type": "text", "text": "What is here?"}]}
    assert proc.stdout == janus.chat([message], max_new_tokens=6).text + "\n"


def test_ctrl_c_while_answering_exits_130(tiny_dir) -> None:
    proc = started("chat", str(tiny_dir), "--max-new-tokens", "3000")
    proc.stdin.write(b"Tell me a story.\n")
    proc.stdin.flush()
    assert proc.stdout.read(1)  # the answer is streaming
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and b"Traceback" not in err


def test_ctrl_c_at_the_prompt_exits_130(tiny_dir) -> None:
    proc = started("chat", str(tiny_dir))
    err = b""
    while b"Loaded" not in err:
        chunk = proc.stderr.read1(4096)
        assert chunk, err
        err += chunk
    proc.send_signal(signal.SIGINT)  # waiting for the first line
    out, rest = proc.communicate(timeout=120)
    assert proc.returncode == 130 and out == b"" and b"Traceback" not in rest


def test_closed_pipe_exits_141_quietly(tiny_dir) -> None:
    """`janusvl chat ... | head -c 1`: the reader leaves while the answer streams."""
    proc = started("chat", str(tiny_dir), "Tell me a story.", "--max-new-tokens", "3000")
    assert proc.stdout.read(1)
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 141
    assert b"Traceback" not in err and b"Exception ignored" not in err and b"error" not in err


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantize_chat_gives_the_quantised_models_answer(tiny_dir, image_path, scheme: str) -> None:
    proc = janusvl("chat", str(tiny_dir), "--quantize", scheme, "--image", str(image_path), "Describe this image.",
                   "--max-new-tokens", "8")
    assert proc.returncode == 0, proc.stderr
    quantised = Janus.from_pretrained(tiny_dir, device="cpu", quantize=scheme)
    assert isinstance(quantised.model.language_model.lm_head, {"int8": Int8Linear, "int4": Int4Linear}[scheme])
    answer = quantised.chat([image_message("Describe this image.", image_path)], max_new_tokens=8).text
    assert proc.stdout == answer + "\n"


def test_quantize_int8_imagine_gives_the_int8_models_images(tmp_path) -> None:
    # 64-pixel images: a 4 x 4 grid of codes keeps image generation to 16 steps
    ckpt = write_checkpoint(tmp_path / "small", dtype=torch.float32, seed=2, image_size=64)
    proc = janusvl("imagine", str(ckpt), "a red cube", "--quantize", "int8", "--seed", "3", "-o", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr
    with Image.open(tmp_path / "out" / "image-000.png") as png:
        got = png.convert("RGB").tobytes()
    images = {q: Janus.from_pretrained(ckpt, device="cpu", quantize=q).generate_images("a red cube", seed=3)[0]
              for q in ("int8", None)}
    assert images["int8"].size == (64, 64) and got == images["int8"].tobytes() != images[None].tobytes()


def test_quantize_reaches_the_bench(tiny_dir, monkeypatch, capsys) -> None:
    """`bench --quantize int8` measures an int8 decoder (the run itself: tests/test_bench.py)."""
    from janusvl import benchmark

    asked = []
    monkeypatch.setattr(benchmark, "run", lambda model, **kw: asked.append(kw["quantize"]) or {})
    monkeypatch.setattr(benchmark, "format_table", lambda report: "table")
    for flag, want in ((["--quantize", "int8"], "int8"), ([], None)):
        assert main(["bench", str(tiny_dir), *flag, "--no-images", "--no-transformers"]) == 0
        assert asked.pop() == want
    opts = {"quantize": "int8", "dtype": benchmark.engine_dtypes()["janusvl"]}  # what the worker gets
    model, _, _ = benchmark._load_janusvl(tiny_dir, opts)
    assert isinstance(model.language_model.lm_head, Int8Linear)


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
    (["--temperature", "-1", "hi"], "--temperature must be >= 0, got -1"),
    (["--top-p", "0", "hi"], "--top-p must be in (0, 1], got 0"),
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
