"""Trigger tokens that learn (textual inversion, pivotal tuning) on the tiny models: options and errors, only the
new rows train, exact resume, the A1111/ComfyUI embedding file and the bundled LoRA file, diffusers'
``load_textual_inversion`` in a fresh pipeline, the preview, ``inspect``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from sdlora.lora import inspect_file
from sdlora.train import RunDir, train
from sdlora.train.config import ConfigError, TrainConfig
from sdlora.train.embeddings import TokenEmbeddingWithNewRows, add_trained_tokens

from helpers import make_images, resume_from_copy, tiny_cfg

EMB = ("embedding_tokens=2", "sample_prompts=[]", "max_train_steps=6", "save_every_n_steps=3", "network_preset=attn",
       "embedding_lr=5e-2")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_images(tmp_path_factory.mktemp("emb-data") / "imgs", n=4)


@pytest.fixture(scope="module")
def pivotal(tmp_path_factory, data):
    """A pivotal run (LoRA + 2 tokens initialised from 'painting'), 6 steps, checkpoints at 3 and 6."""
    tmp = tmp_path_factory.mktemp("pivotal")
    return tmp, train(tiny_cfg(tmp, data, "piv", *EMB, "embedding_init=painting"))


@pytest.fixture(scope="module")
def inversion(tmp_path_factory, data):
    """Textual inversion alone (random init), the tokens stop after half of the 6 steps."""
    tmp = tmp_path_factory.mktemp("ti")
    return tmp, train(tiny_cfg(tmp, data, "ti", *EMB, "embedding_only=true", "embedding_stop_fraction=0.5"))


def _base(spec: str):
    """A base model with tokenizers of its own (the shipped ones are shared in the process)."""
    from sdlora.lora.formats.embedding import own_tokenizers
    from sdlora.models.loading import load_base

    base = load_base(spec)
    own_tokenizers(base.pipe)
    return base


def _prompt_embeds(pipe, prompt: str) -> torch.Tensor:
    with torch.no_grad():
        return pipe.encode_prompt(prompt, "cpu", 1, False)[0]


# ---- options --------------------------------------------------------------------------------------
@pytest.mark.parametrize("sets, key", [
    (["embedding_only=true"], "embedding_only"),
    (["embedding_tokens=2", "caption_template={caption}"], "embedding_tokens"),
    (["embedding_init=painting"], "embedding_init"),
    (["embedding_tokens=2", "embedding_stop_fraction=0.01", "max_train_steps=10"], "embedding_stop_fraction"),
    (["embedding_tokens=99"], "embedding_tokens"),
    (["embedding_tokens=2", "embedding_lr=0"], "embedding_lr"),
])
def test_bad_options_name_the_key(sets, key):
    with pytest.raises(ConfigError) as e:
        TrainConfig.from_toml(None, ["train_data_dir=.", *sets]).validate(check_paths=False)
    assert e.value.key == key


def test_fields_are_in_the_form():
    names = {f["name"]: f for f in TrainConfig.field_info()}
    for n in ("embedding_tokens", "embedding_init", "embedding_only", "embedding_lr", "embedding_stop_fraction"):
        assert names[n]["ui"] and names[n]["section"] and names[n]["help"]


def test_captions_and_samples_use_the_tokens(tmp_path, data):
    from sdlora.train.batches import caption_config
    from sdlora.train.samples import sample_prompts

    cfg = tiny_cfg(tmp_path, data, "c", "embedding_tokens=3")
    assert caption_config(cfg).base_caption("a red square") == "a red square, in <s0><s1><s2> style"
    assert sample_prompts(cfg) == ["a red circle on a white background, in <s0><s1><s2> style"]


def test_unknown_init_phrase_and_known_tokens_are_config_errors(tmp_path, data):
    from sdlora.models.loading import load_base

    base = _base("tiny")
    cfg = tiny_cfg(tmp_path, data, "x", "embedding_tokens=2", "embedding_init=painting")

    class Empty:  # a tokenizer for which the phrase is no tokens at all
        def __init__(self, inner):
            self.inner = inner

        def get_vocab(self):
            return self.inner.get_vocab()

        def __call__(self, *a, **k):
            return type("R", (), {"input_ids": []})()

    with pytest.raises(ConfigError) as e:
        add_trained_tokens(cfg, [Empty(base.tokenizers[0])], base.text_encoders)
    assert e.value.key == "embedding_init"
    add_trained_tokens(cfg, base.tokenizers, base.text_encoders)
    with pytest.raises(ConfigError) as e:
        add_trained_tokens(cfg, base.tokenizers, base.text_encoders)
    assert e.value.key == "embedding_tokens" and "<s0>" in str(e.value)


# ---- only the new rows train ------------------------------------------------------------------------
def test_only_the_new_rows_train_and_the_table_stays_bit_identical(tmp_path, data):
    from sdlora.models.loading import load_base
    from sdlora.train.conditioning import Conditioner

    base = _base("tiny")
    encoder = base.text_encoders[0]
    before = encoder.get_input_embeddings().weight.detach().clone()
    encoder.requires_grad_(False)
    cfg = tiny_cfg(tmp_path, data, "x", "embedding_tokens=2", "embedding_init=painting")
    tokens = add_trained_tokens(cfg, base.tokenizers, base.text_encoders)
    layer = encoder.get_input_embeddings()
    assert isinstance(layer, TokenEmbeddingWithNewRows)
    paint = base.tokenizers[0]("painting", add_special_tokens=False).input_ids
    assert torch.equal(layer.rows[0], before[paint[0]])  # initialised from the phrase
    opt = torch.optim.AdamW(tokens.parameters(), lr=0.1)
    start = layer.rows.detach().clone()
    for _ in range(3):
        out = Conditioner(base).encode(["a red square, in <s0><s1> style"])
        out.hidden.pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    assert not torch.equal(layer.rows, start)
    assert torch.equal(layer.original.weight, before) and not layer.original.weight.requires_grad
    assert [p for p in encoder.parameters() if p.requires_grad] == [layer.rows]


# ---- training, resume, files ------------------------------------------------------------------------
def test_pivotal_run_writes_the_lora_with_bundled_embeddings_and_the_embedding_file(pivotal):
    tmp, res = pivotal
    emb = res.run_dir / "embeddings" / "tinystyle.safetensors"
    assert res.lora_path and emb.is_file()
    rows = load_file(str(emb))
    assert list(rows) == ["emb_params"] and rows["emb_params"].shape == (2, 32)
    lora = load_file(str(res.lora_path))
    assert torch.equal(lora["bundle_emb.tinystyle.string_to_param.*"], rows["emb_params"])
    info = inspect_file(res.lora_path)
    assert info["embeddings"] == {"tinystyle": {"string_to_param.*": [2, 32]}} and not info["stray_keys"]
    from sdlora.lora.formats import format_inspection

    assert "embedding:    tinystyle (2 vector(s)" in format_inspection(info)
    # the loader places every LoRA module and reports no bundled key as unknown
    from sdlora.generate import Previewer

    prev = Previewer("tiny")
    name = prev.load_lora(res.lora_path)
    assert not prev.reports[name].unknown_keys
    assert "tinystyle_1" in prev.pipe.tokenizer.get_vocab()  # the bundled embedding came with the LoRA


def test_pivotal_resume_is_exact(pivotal, tmp_path):
    _, straight = pivotal
    dest = tmp_path / "resumed"
    resumed = resume_from_copy(straight.run_dir, 3, dest)
    a, b = load_file(str(straight.lora_path)), load_file(str(resumed.lora_path))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ea = load_file(str(straight.run_dir / "embeddings" / "tinystyle.safetensors"))
    eb = load_file(str(dest / "embeddings" / "tinystyle.safetensors"))
    assert torch.equal(ea["emb_params"], eb["emb_params"])


def test_textual_inversion_alone_stops_the_tokens_and_writes_no_lora(inversion):
    _, res = inversion
    assert res.lora_path is None and not RunDir(res.run_dir).lora_path.exists()
    final = load_file(str(res.run_dir / "embeddings" / "tinystyle.safetensors"))["emb_params"]
    at3 = load_file(str(res.run_dir / "checkpoints" / "step-3" / "embeddings.safetensors"))["te0"]
    assert torch.equal(final, at3)  # embedding_stop_fraction=0.5 of 6 steps: no change after step 3
    assert final.abs().sum() > 0


def test_diffusers_load_textual_inversion_gives_sdloras_prompt_embeddings(inversion):
    """The embedding file in a fresh diffusers pipeline (``load_textual_inversion(file, token=...)``): the prompt
    with the trigger word encodes exactly as sdlora encodes the training caption with the tokens."""
    from sdlora.generate import Previewer
    from sdlora.models.loading import load_base

    _, res = inversion
    emb = res.run_dir / "embeddings" / "tinystyle.safetensors"
    fresh = _base("tiny").pipe
    fresh.load_textual_inversion(str(emb), token="tinystyle")
    theirs = _prompt_embeds(fresh, "a red square, in tinystyle style")

    base = _base("tiny")
    cfg = RunDir(res.run_dir).load_config()
    tokens = add_trained_tokens(cfg, base.tokenizers, base.text_encoders)
    tokens.load_state_dict({"te0": load_file(str(emb))["emb_params"]})
    ours = _prompt_embeds(base.pipe, "a red square, in <s0><s1> style")
    assert torch.equal(theirs, ours)
    plain = _prompt_embeds(load_base("tiny").pipe, "a red square, in tinystyle style")
    assert not torch.allclose(theirs, plain)

    # the preview loads the same file the same way: same images as the fresh diffusers pipeline
    prev = Previewer("tiny")
    assert prev.load_embedding(emb) == ["tinystyle"]
    img = prev.generate("a red square, in tinystyle style", seed=3, steps=2, scheduler="Euler", output="np")
    fresh.scheduler = prev._scheduler("Euler")
    ref = fresh("a red square, in tinystyle style", num_inference_steps=2, guidance_scale=7.0, output_type="np",
                generator=torch.Generator("cpu").manual_seed(3)).images
    assert (abs(img - ref)).max() < 1e-5


def test_sdxl_both_encoders_file_and_diffusers(tmp_path, data):
    from sdlora.generate import Previewer
    from sdlora.models.loading import load_base
    model = "tiny-sdxl"  # built the same (seed 0) each time it is loaded
    res = train(tiny_cfg(tmp_path, data, "xl", *EMB, "embedding_init=oil painting", "max_train_steps=3",
                         "save_every_n_steps=0", "train_text_encoder=false", model=model))
    emb = res.run_dir / "embeddings" / "tinystyle.safetensors"
    rows = load_file(str(emb))
    assert sorted(rows) == ["clip_g", "clip_l"] and rows["clip_l"].shape == (2, 32) and rows["clip_g"].shape == (2, 64)
    lora = load_file(str(res.lora_path))
    assert torch.equal(lora["bundle_emb.tinystyle.clip_l"], rows["clip_l"])
    assert torch.equal(lora["bundle_emb.tinystyle.clip_g"], rows["clip_g"])

    fresh = _base(model).pipe
    fresh.load_textual_inversion(rows["clip_l"], token="tinystyle", text_encoder=fresh.text_encoder,
                                 tokenizer=fresh.tokenizer)
    fresh.load_textual_inversion(rows["clip_g"], token="tinystyle", text_encoder=fresh.text_encoder_2,
                                 tokenizer=fresh.tokenizer_2)
    with torch.no_grad():
        theirs = fresh.encode_prompt("a red square, in tinystyle style", device="cpu", do_classifier_free_guidance=False)
    base = _base(model)
    tokens = add_trained_tokens(RunDir(res.run_dir).load_config(), base.tokenizers, base.text_encoders)
    tokens.load_state_dict({"te0": rows["clip_l"], "te1": rows["clip_g"]})
    with torch.no_grad():
        ours = base.pipe.encode_prompt("a red square, in <s0><s1> style", device="cpu", do_classifier_free_guidance=False)
    assert torch.equal(theirs[0], ours[0]) and torch.equal(theirs[2], ours[2])  # hidden states and pooled

    prev = Previewer(load_base(model))
    prev.load_lora(res.lora_path)  # bundled embeddings come with the LoRA, into both encoders
    assert "tinystyle_1" in prev.pipe.tokenizer.get_vocab() and "tinystyle_1" in prev.pipe.tokenizer_2.get_vocab()
    with safe_open(str(res.lora_path), framework="pt") as f:
        assert f.metadata()["sdlora_bundled_embeddings"] == "tinystyle"


def test_cli_generate_with_an_embedding(inversion, tmp_path):
    from PIL import Image

    from sdlora.cli import main

    _, res = inversion
    emb = res.run_dir / "embeddings" / "tinystyle.safetensors"
    outs = []
    for extra in ([], ["--embedding", str(emb)], ["--embedding", f"{emb}=mytok"]):
        out = tmp_path / f"img{len(outs)}.png"
        prompt = "a red square, in mytok style" if "=mytok" in " ".join(extra) else "a red square, in tinystyle style"
        assert main(["generate", "--base", "tiny", "--prompt", prompt, "--steps", "2", "--width", "64", "--height", "64",
                     "--scheduler", "euler", "--out", str(out), *extra]) == 0
        outs.append(list(Image.open(out).getdata()))
    assert outs[1] != outs[0] and outs[1] == outs[2]  # the word picks the embedding; its name is the file's or given
