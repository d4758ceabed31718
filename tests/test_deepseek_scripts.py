"""DeepSeek's five scripts (deepseek-ai/Janus: inference.py, generation_inference.py,
interactivechat.py, demo/app_januspro.py, demo/fastapi_app.py), each followed call for call with
janusvl imported in place of `transformers` and `janus`, on tiny checkpoints whose config says
bfloat16 while their weights are float32 (DeepSeek's loader reads them as float32; the scripts cast).

The only other change is the one a machine without a GPU needs: the scripts' unconditional
`.cuda()` calls are left out (app_januspro.py checks for CUDA itself). Each script's answers and
images are checked against janusvl's own API (`Janus.chat`, `generate_image_tokens`), and its
model, in the dtype the script runs, against transformers' Janus holding the same weights.
Image scripts draw from torch's global RNG; the tests seed it where the script does not.
"""

from __future__ import annotations

import io
import os
import re
import time
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
import transformers
from fastapi import FastAPI, File, Form, HTTPException, UploadFile
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.testclient import TestClient

from conftest import make_image
from janusvl import (AutoConfig, AutoModelForCausalLM, Janus, MultiModalityCausalLM, VLChatProcessor,
                     load_pil_images)
from janusvl.generation.image import decode_image_tokens, generate_image_tokens
from janusvl.loading.hf_layout import to_transformers_state_dict, transformers_config_dict
from janusvl.testing.checkpoint import write_checkpoint
from test_image_generation import deepseek_generate  # generation_inference.py's generate()

SEED = 3
V1 = ("User", "Assistant")  # Janus-1.3B's roles (inference.py, the image scripts, fastapi_app.py)
PRO = ("<|User|>", "<|Assistant|>")  # Janus-Pro's (app_januspro.py)
# Relative L2 distance allowed between janusvl and transformers, both in the script's dtype.
TOLERANCE = {torch.bfloat16: 0.03, torch.float16: 0.005}


@pytest.fixture(scope="module")
def v1_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("v1") / "Janus-1.3B", dtype=torch.float32,
                            config_dtype=torch.bfloat16, seed=11, roles="1.3b")


@pytest.fixture(scope="module")
def pro_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("pro") / "Janus-Pro-7B", dtype=torch.float32,
                            config_dtype=torch.bfloat16, seed=12, roles="pro")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tiny models' steps are a few small kernels each: on a shared 2-core machine a second
    thread only adds waiting (a CFG step took 285 ms with two threads, 40 ms with one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def in_tmp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The scripts read images/... and write generated_samples/ relative to where they run."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


# --- the oracles ----------------------------------------------------------------------------------

def transformers_janus(ckpt: Path, dtype: torch.dtype) -> transformers.JanusForConditionalGeneration:
    """transformers' Janus holding the checkpoint's stored (float32) weights, cast as the script casts."""
    ours = AutoModelForCausalLM.from_pretrained(ckpt)
    image_id = VLChatProcessor.from_pretrained(ckpt).image_id
    hf = transformers.JanusForConditionalGeneration(
        transformers.JanusConfig(**transformers_config_dict(ours.config, image_id))).eval()
    hf.load_state_dict(to_transformers_state_dict(ours.state_dict()), strict=True)
    return hf.to(dtype)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@torch.inference_mode()
def check_understanding_against_transformers(ckpt: Path, vl_gpt: MultiModalityCausalLM, inputs) -> None:
    """The script's model on the script's inputs: fused embeddings and the first answer token's
    logits within the dtype's rounding of transformers' Janus, and the same greedy first token."""
    hf = transformers_janus(ckpt, vl_gpt.dtype)
    ids, mask = inputs.input_ids, inputs.attention_mask
    embeds = vl_gpt.prepare_inputs_embeds(**inputs)
    features = hf.model.get_image_features(inputs.pixel_values[0].to(hf.dtype)).pooler_output
    theirs = hf.model.get_input_embeddings()(ids).masked_scatter(
        inputs.images_seq_mask[..., None], features.reshape(-1, embeds.shape[-1]))
    got = vl_gpt.language_model(inputs_embeds=embeds, attention_mask=mask).logits[:, -1]
    want = hf(inputs_embeds=theirs, attention_mask=mask).logits[:, -1]
    tolerance = TOLERANCE[vl_gpt.dtype]
    assert relative(embeds, theirs) < tolerance and relative(got, want) < tolerance
    assert torch.equal(got.argmax(-1), want.argmax(-1))


@torch.inference_mode()
def check_guidance_against_transformers(ckpt: Path, vl_gpt: MultiModalityCausalLM, input_ids: list[int],
                                        pad_id: int, cfg_weight: float) -> None:
    """The first image token's guided logits (prompt row and its padded twin) against transformers'."""
    hf = transformers_janus(ckpt, vl_gpt.dtype)
    rows = torch.tensor([input_ids, [input_ids[0]] + [pad_id] * (len(input_ids) - 2) + [input_ids[-1]]])
    guided = []
    for lm, head in ((vl_gpt.language_model.model, vl_gpt.gen_head),
                     (hf.model.language_model, hf.model.generation_head)):
        logits = head(lm(inputs_embeds=lm.embed_tokens(rows)).last_hidden_state[:, -1])
        guided.append(logits[1] + cfg_weight * (logits[0] - logits[1]))
    assert relative(*guided) < TOLERANCE[vl_gpt.dtype]


def library_images(ckpt: Path, dtype: torch.dtype, prompt: str, n: int, seed: int, cfg_weight: float = 5.0,
                   temperature: float = 1.0) -> tuple[torch.Tensor, list[PIL.Image.Image]]:
    """janusvl's own image path: the codes of `n` images, and the first and last images decoded."""
    processor = VLChatProcessor.from_pretrained(ckpt)
    model = MultiModalityCausalLM.from_pretrained(ckpt, dtype=dtype)
    codes = generate_image_tokens(model, processor, prompt, n=n, cfg_weight=cfg_weight,
                                  temperature=temperature, seed=seed)
    return codes, decode_image_tokens(model, codes[sorted({0, n - 1})])


def encoded(image: PIL.Image.Image, **save: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, **save)
    return buf.getvalue()


# --- shared by the scripts ------------------------------------------------------------------------

def demo_seed(seed: int) -> None:
    """Both demos' first calls: free CUDA's cache, seed every RNG."""
    torch.cuda.empty_cache()
    torch.manual_seed(seed)
    np.random.seed(seed)
    torch.cuda.manual_seed(seed)


def demo_understanding(vl_gpt, vl_chat_processor, conversation: list[dict], pil_images: list,
                       device: str, top_p: float, temperature: float):
    """Both demos' `multimodal_understanding` after seeding: the answer and the model inputs."""
    tokenizer = vl_chat_processor.tokenizer
    prepare_inputs = vl_chat_processor(conversations=conversation, images=pil_images, force_batchify=True
                                       ).to(device, dtype=torch.bfloat16 if torch.cuda.is_available() else torch.float16)
    inputs_embeds = vl_gpt.prepare_inputs_embeds(**prepare_inputs)
    outputs = vl_gpt.language_model.generate(
        inputs_embeds=inputs_embeds, attention_mask=prepare_inputs.attention_mask,
        pad_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, max_new_tokens=512,
        do_sample=False if temperature == 0 else True, use_cache=True, temperature=temperature, top_p=top_p)
    return tokenizer.decode(outputs[0].cpu().tolist(), skip_special_tokens=True), prepare_inputs


def image_prompt(vl_chat_processor, roles: tuple[str, str], text: str) -> str:
    conversation = [{"role": roles[0], "content": text}, {"role": roles[1], "content": ""}]
    sft_format = vl_chat_processor.apply_sft_template_for_multi_turn_prompts(
        conversations=conversation, sft_format=vl_chat_processor.sft_format, system_prompt="")
    return sft_format + vl_chat_processor.image_start_tag


# --- inference.py ---------------------------------------------------------------------------------

def test_inference_py(v1_dir, capsys) -> None:
    os.makedirs("images")
    make_image(320, 120, seed=1).save("images/equation.png")

    model_path = str(v1_dir)
    vl_chat_processor: VLChatProcessor = VLChatProcessor.from_pretrained(model_path)
    tokenizer = vl_chat_processor.tokenizer
    vl_gpt: MultiModalityCausalLM = AutoModelForCausalLM.from_pretrained(model_path, trust_remote_code=True)
    assert vl_gpt.dtype == torch.float32  # as transformers 4.x loads it, whatever config.json says
    vl_gpt = vl_gpt.to(torch.bfloat16).eval()  # the script's line, less `.cuda()`
    conversation = [
        {"role": "User", "content": "<image_placeholder>\nConvert the formula into latex code.",
         "images": ["images/equation.png"]},
        {"role": "Assistant", "content": ""},
    ]
    pil_images = load_pil_images(conversation)
    prepare_inputs = vl_chat_processor(conversations=conversation, images=pil_images,
                                       force_batchify=True).to(vl_gpt.device)
    inputs_embeds = vl_gpt.prepare_inputs_embeds(**prepare_inputs)
    outputs = vl_gpt.language_model.generate(
        inputs_embeds=inputs_embeds, attention_mask=prepare_inputs.attention_mask,
        pad_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, max_new_tokens=512, do_sample=False, use_cache=True)
    answer = tokenizer.decode(outputs[0].cpu().tolist(), skip_special_tokens=True)
    print(f"{prepare_inputs['sft_format'][0]}", answer)

    printed = capsys.readouterr().out
    assert printed.startswith(vl_chat_processor.system_prompt + "\n\nUser: <image_placeholder>\nConvert")
    assert printed == f"{prepare_inputs['sft_format'][0]} {answer}\n" and len(answer) > 100
    janus = Janus.from_pretrained(model_path, device="cpu", dtype="bfloat16")
    result = janus.chat(conversation, max_new_tokens=512)
    assert (result.text, result.completion_tokens) == (answer, outputs.shape[1])
    check_understanding_against_transformers(v1_dir, vl_gpt, prepare_inputs)


# --- generation_inference.py and interactivechat.py -----------------------------------------------

def test_generation_inference_py(v1_dir) -> None:
    model_path = str(v1_dir)
    vl_chat_processor: VLChatProcessor = VLChatProcessor.from_pretrained(model_path)
    vl_gpt: MultiModalityCausalLM = AutoModelForCausalLM.from_pretrained(model_path, trust_remote_code=True)
    vl_gpt = vl_gpt.to(torch.bfloat16).eval()
    text = "A close-up photo of a lighthouse under a night sky of swirling stars."
    prompt = image_prompt(vl_chat_processor, V1, text)

    # the script's generate(vl_gpt, vl_chat_processor, prompt): its defaults but parallel_size,
    # 16 there; 2 here keeps the test short (the calls are the same, the batch smaller)
    parallel_size = 2
    torch.manual_seed(SEED)  # the script leaves torch's global RNG unseeded
    generated_tokens, visual_img = deepseek_generate(vl_gpt, vl_chat_processor, prompt, parallel_size=parallel_size)
    os.makedirs("generated_samples", exist_ok=True)
    for i in range(parallel_size):
        PIL.Image.fromarray(visual_img[i]).save(os.path.join("generated_samples", f"img_{i}.jpg"))

    codes, images = library_images(v1_dir, torch.bfloat16, text, n=parallel_size, seed=SEED)
    assert torch.equal(generated_tokens.long(), codes) and len(set(codes[0].tolist())) > 100
    for i, image in zip((0, parallel_size - 1), images):
        assert Path(f"generated_samples/img_{i}.jpg").read_bytes() == encoded(image, format="JPEG")
    ids = vl_chat_processor.tokenizer.encode(prompt)
    check_guidance_against_transformers(v1_dir, vl_gpt, ids, vl_chat_processor.pad_id, 5)


def test_interactivechat_py(v1_dir, monkeypatch, capsys) -> None:
    model_path = str(v1_dir)
    vl_chat_processor: VLChatProcessor = VLChatProcessor.from_pretrained(model_path)
    vl_gpt: MultiModalityCausalLM = AutoModelForCausalLM.from_pretrained(model_path, trust_remote_code=True)
    vl_gpt = vl_gpt.to(torch.bfloat16).eval()
    answers = iter(["two", "1", "A red fox in the snow!", "exit"])
    monkeypatch.setattr("builtins.input", lambda _prompt="": next(answers))
    torch.manual_seed(SEED)

    # interactive_image_generator(): ask for the number of images, then prompts until 'exit'
    while not (reply := input("How many images?")).isdigit():
        print("Invalid input. Please enter a positive integer.")
    parallel_size = int(reply)
    while (user_input := input("Describe the image: ")).lower() != "exit":
        prompt = image_prompt(vl_chat_processor, V1, user_input)
        short_prompt = re.sub(r"\W+", "_", user_input)[:50]
        generated_tokens, visual_img = deepseek_generate(vl_gpt, vl_chat_processor, prompt,
                                                         parallel_size=parallel_size)
        os.makedirs("generated_samples", exist_ok=True)
        for i in range(parallel_size):
            name = f"img_{time.strftime('%Y%m%d-%H%M%S')}_{short_prompt}_{i}.jpg"
            PIL.Image.fromarray(visual_img[i]).save(os.path.join("generated_samples", name))

    assert capsys.readouterr().out.count("Invalid input") == 1
    saved = sorted(Path("generated_samples").glob("img_*_A_red_fox_in_the_snow_*.jpg"))
    assert [p.name[-6:] for p in saved] == ["_0.jpg"]
    codes, images = library_images(v1_dir, torch.bfloat16, "A red fox in the snow!", n=1, seed=SEED)
    assert torch.equal(generated_tokens.long(), codes)
    assert saved[0].read_bytes() == encoded(images[0], format="JPEG")


# --- demo/app_januspro.py -------------------------------------------------------------------------

class AppJanusPro:
    """app_januspro.py without its Gradio UI: the model set-up at import, and the two functions
    its buttons call."""

    def __init__(self, model_path: str) -> None:
        config = AutoConfig.from_pretrained(model_path)
        language_config = config.language_config
        language_config._attn_implementation = "eager"
        vl_gpt = AutoModelForCausalLM.from_pretrained(model_path, language_config=language_config,
                                                      trust_remote_code=True)
        if torch.cuda.is_available():
            vl_gpt = vl_gpt.to(torch.bfloat16).cuda()
        else:
            vl_gpt = vl_gpt.to(torch.float16)
        self.vl_gpt = vl_gpt
        self.vl_chat_processor = VLChatProcessor.from_pretrained(model_path)
        self.tokenizer = self.vl_chat_processor.tokenizer
        self.cuda_device = "cuda" if torch.cuda.is_available() else "cpu"

    @torch.inference_mode()
    def multimodal_understanding(self, image: np.ndarray, question: str, seed: int, top_p: float,
                                 temperature: float) -> str:
        demo_seed(seed)
        conversation = [{"role": "<|User|>", "content": f"<image_placeholder>\n{question}", "images": [image]},
                        {"role": "<|Assistant|>", "content": ""}]
        pil_images = [PIL.Image.fromarray(image)]
        answer, self.prepare_inputs = demo_understanding(self.vl_gpt, self.vl_chat_processor, conversation,
                                                         pil_images, self.cuda_device, top_p, temperature)
        return answer

    @torch.inference_mode()
    def generate_image(self, prompt: str, seed: int | None = None, guidance: float = 5,
                       t2i_temperature: float = 1.0) -> list[PIL.Image.Image]:
        torch.cuda.empty_cache()
        if seed is not None:
            torch.manual_seed(seed)
            torch.cuda.manual_seed(seed)
            np.random.seed(seed)
        text = image_prompt(self.vl_chat_processor, PRO, prompt)
        # its generate() + unpack(): generation_inference.py's loop with 5 images, 384 x 384
        _, images = deepseek_generate(self.vl_gpt, self.vl_chat_processor, text, temperature=t2i_temperature,
                                      parallel_size=5, cfg_weight=guidance)
        return [PIL.Image.fromarray(images[i]).resize((768, 768), PIL.Image.LANCZOS) for i in range(5)]


def test_app_januspro_understanding(pro_dir) -> None:
    app = AppJanusPro(str(pro_dir))
    assert app.vl_gpt.dtype == torch.float16 and app.cuda_device == "cpu"  # no GPU here: its CPU branch
    image = np.asarray(make_image(200, 150, seed=4))
    answer = app.multimodal_understanding(image, "explain this meme", 42, 0.95, 0.1)  # the UI's defaults
    conversation = [{"role": "<|User|>", "content": "<image_placeholder>\nexplain this meme",
                     "images": [PIL.Image.fromarray(image)]}, {"role": "<|Assistant|>", "content": ""}]
    # transformers' generate samples with top_k 50 unless told otherwise; DeepSeek's call relies on it
    janus = Janus.from_pretrained(pro_dir, device="cpu", dtype="float16")
    assert janus.chat(conversation, max_new_tokens=512, temperature=0.1, top_p=0.95, top_k=50, seed=42).text == answer
    assert len(answer) > 100
    check_understanding_against_transformers(pro_dir, app.vl_gpt, app.prepare_inputs)


def test_app_januspro_image_generation(pro_dir) -> None:
    app = AppJanusPro(str(pro_dir))
    prompt = "A glass of red wine on a reflective surface."
    images = app.generate_image(prompt, seed=12345, guidance=5, t2i_temperature=1.0)  # the UI's defaults
    assert [(im.mode, im.size) for im in images] == [("RGB", (768, 768))] * 5
    codes, ours = library_images(pro_dir, torch.float16, prompt, n=5, seed=12345)
    for got, want in zip((images[0], images[-1]), ours):
        assert got.tobytes() == want.resize((768, 768), PIL.Image.LANCZOS).tobytes()
    ids = app.tokenizer.encode(image_prompt(app.vl_chat_processor, PRO, prompt))
    check_guidance_against_transformers(pro_dir, app.vl_gpt, ids, app.vl_chat_processor.pad_id, 5)


# --- demo/fastapi_app.py --------------------------------------------------------------------------

def fastapi_app(model_path: str):
    """fastapi_app.py's app: the same model set-up (less `.cuda()`), endpoints and form fields."""
    app = FastAPI()
    config = AutoConfig.from_pretrained(model_path)
    language_config = config.language_config
    language_config._attn_implementation = "eager"
    vl_gpt = AutoModelForCausalLM.from_pretrained(model_path, language_config=language_config,
                                                  trust_remote_code=True)
    vl_gpt = vl_gpt.to(torch.bfloat16)
    vl_chat_processor = VLChatProcessor.from_pretrained(model_path)
    cuda_device = "cuda" if torch.cuda.is_available() else "cpu"
    app.state.vl_gpt, app.state.vl_chat_processor = vl_gpt, vl_chat_processor

    @torch.inference_mode()
    def multimodal_understanding(image_data: bytes, question: str, seed: int, top_p: float,
                                 temperature: float) -> str:
        demo_seed(seed)
        conversation = [{"role": "User", "content": f"<image_placeholder>\n{question}", "images": [image_data]},
                        {"role": "Assistant", "content": ""}]
        pil_images = [PIL.Image.open(io.BytesIO(image_data))]
        answer, app.state.prepare_inputs = demo_understanding(vl_gpt, vl_chat_processor, conversation,
                                                              pil_images, cuda_device, top_p, temperature)
        return answer

    @app.post("/understand_image_and_question/")
    async def understand_image_and_question(file: UploadFile = File(...), question: str = Form(...),
                                            seed: int = Form(42), top_p: float = Form(0.95),
                                            temperature: float = Form(0.1)):
        image_data = await file.read()
        response = multimodal_understanding(image_data, question, seed, top_p, temperature)
        return JSONResponse({"response": response})

    @torch.inference_mode()
    def generate_image(prompt: str, seed: int | None, guidance: float) -> list[PIL.Image.Image]:
        torch.cuda.empty_cache()
        seed = seed if seed is not None else 12345
        torch.manual_seed(seed)
        torch.cuda.manual_seed(seed)
        np.random.seed(seed)
        text = image_prompt(vl_chat_processor, V1, prompt)
        _, images = deepseek_generate(vl_gpt, vl_chat_processor, text, parallel_size=5, cfg_weight=guidance)
        return [PIL.Image.fromarray(images[i]).resize((1024, 1024), PIL.Image.LANCZOS) for i in range(5)]

    @app.post("/generate_images/")
    async def generate_images(prompt: str = Form(...), seed: int = Form(None), guidance: float = Form(5.0)):
        try:
            images = generate_image(prompt, seed, guidance)

            def image_stream():
                for img in images:
                    yield encoded(img, format="PNG")

            return StreamingResponse(image_stream(), media_type="multipart/related")
        except Exception as e:
            raise HTTPException(status_code=500, detail=f"Image generation failed: {e}") from e

    return app


@pytest.fixture(scope="module")
def fastapi_client(v1_dir):
    with TestClient(fastapi_app(str(v1_dir))) as client:
        yield client


def test_fastapi_understand_image_and_question(v1_dir, fastapi_client) -> None:
    # On a CPU the demo casts pixel values to float16 while its model is bfloat16; janusvl then
    # casts them to the model's dtype. A 384x384 black-and-white picture is not resized and its
    # pixel values (-1 and 1) are exact in both, so the library, which rounds once, sees the same.
    bits = np.random.default_rng(5).integers(0, 2, (384, 384, 3), dtype=np.uint8) * 255
    png = encoded(PIL.Image.fromarray(bits), format="PNG")
    reply = fastapi_client.post("/understand_image_and_question/", files={"file": ("cat.png", png, "image/png")},
                                data={"question": "What is in this picture?"})  # seed, top_p, temperature: defaults
    assert reply.status_code == 200
    answer = reply.json()["response"]
    app = fastapi_client.app
    assert app.state.vl_gpt.dtype == torch.bfloat16 and app.state.prepare_inputs.pixel_values.dtype == torch.float16
    conversation = [{"role": "User", "content": "<image_placeholder>\nWhat is in this picture?", "images": [png]},
                    {"role": "Assistant", "content": ""}]
    janus = Janus.from_pretrained(v1_dir, device="cpu", dtype="bfloat16")
    assert janus.chat(conversation, max_new_tokens=512, temperature=0.1, top_p=0.95, top_k=50, seed=42).text == answer
    assert len(answer) > 100
    missing = fastapi_client.post("/understand_image_and_question/", data={"question": "?"})
    assert missing.status_code == 422 and "file" in missing.text  # FastAPI's validation, as upstream
    check_understanding_against_transformers(v1_dir, app.state.vl_gpt, app.state.prepare_inputs)


def test_fastapi_generate_images(v1_dir, fastapi_client) -> None:
    prompt = "A cute baby fox with big brown eyes."
    reply = fastapi_client.post("/generate_images/", data={"prompt": prompt})  # seed None: 12345
    assert reply.status_code == 200 and reply.headers["content-type"] == "multipart/related"
    # the stream is the five PNG files back to back
    pngs = [b"\x89PNG" + part for part in reply.content.split(b"\x89PNG")[1:]]
    images = [PIL.Image.open(io.BytesIO(p)) for p in pngs]
    assert [(im.mode, im.size) for im in images] == [("RGB", (1024, 1024))] * 5
    _, ours = library_images(v1_dir, torch.bfloat16, prompt, n=5, seed=12345)
    for got, want in zip((pngs[0], pngs[-1]), ours):
        assert got == encoded(want.resize((1024, 1024), PIL.Image.LANCZOS), format="PNG")
