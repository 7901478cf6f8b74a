"""Single-file Wan2.1-VACE loading: every real on-disk format vs the same weights in the diffusers layout.

Each test writes a tiny random model in a real format (Wan's key names, Comfy-Org's prefixed
names, fp16/bf16/fp8/scaled fp8, Wan's .pth files, ComfyUI's umT5 with its embedded tokenizer),
loads it through the public loader, and compares the modules' outputs with the reference
module saved and re-loaded in the diffusers / transformers layout.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from unison_runtime.errors import WeightsError
from unison_runtime.testing import tiny_wan_files as tw
from unison_runtime.vace import files
from unison_runtime.vace.models import VaceModels
from unison_runtime.vace.umt5_files import wan_t5_to_transformers
from unison_runtime.vace.wan_keys import (
    TRANSFORMER_CONFIG_DIRS,
    expected_transformer_shapes,
    expected_vae_shapes,
    identify,
    load_json,
    transformer_config,
    vae_config,
)

# Tensor names as they appear in Wan's release and Comfy-Org's files (Wan's VaceWanModel /
# ComfyUI's comfy/ldm/wan/model.py), written out by hand.
REAL_TRANSFORMER_NAMES = [
    "patch_embedding.weight", "patch_embedding.bias", "text_embedding.0.weight", "text_embedding.2.bias",
    "time_embedding.0.weight", "time_embedding.2.weight", "time_projection.1.weight", "head.head.weight",
    "head.modulation", "blocks.0.modulation", "blocks.0.self_attn.q.weight", "blocks.0.self_attn.k.bias",
    "blocks.0.self_attn.norm_q.weight", "blocks.0.self_attn.norm_k.weight", "blocks.0.cross_attn.o.bias",
    "blocks.0.cross_attn.v.weight", "blocks.0.norm3.weight", "blocks.0.norm3.bias", "blocks.0.ffn.0.weight",
    "blocks.0.ffn.2.bias", "blocks.1.ffn.2.weight", "vace_patch_embedding.weight", "vace_blocks.0.before_proj.weight",
    "vace_blocks.0.before_proj.bias", "vace_blocks.0.after_proj.weight", "vace_blocks.1.after_proj.bias",
    "vace_blocks.1.modulation", "vace_blocks.1.self_attn.o.weight",
]
REAL_VAE_NAMES = [
    "encoder.conv1.weight", "encoder.downsamples.0.residual.0.gamma", "encoder.downsamples.0.residual.2.weight",
    "encoder.downsamples.0.residual.6.bias", "encoder.downsamples.3.shortcut.weight",
    "encoder.downsamples.2.resample.1.weight", "encoder.downsamples.5.time_conv.weight",
    "encoder.middle.1.to_qkv.weight", "encoder.middle.2.residual.3.gamma", "encoder.head.2.weight", "conv1.weight",
    "conv2.bias", "decoder.conv1.weight", "decoder.middle.0.residual.0.gamma", "decoder.upsamples.3.time_conv.weight",
    "decoder.upsamples.4.shortcut.weight", "decoder.upsamples.11.resample.1.weight",
    "decoder.upsamples.14.residual.6.bias", "decoder.head.0.gamma", "decoder.head.2.bias",
]
PROMPTS = ["A red fox runs through the snow at dawn.", "Zwei Katzen spielen im Garten, 480P."]


def _transformer_inputs(config):
    g = torch.Generator().manual_seed(7)
    return dict(
        hidden_states=torch.randn(1, 16, 2, 4, 4, generator=g),
        timestep=torch.tensor([730]),
        encoder_hidden_states=torch.randn(1, 6, config["text_dim"], generator=g),
        control_hidden_states=torch.randn(1, 96, 2, 4, 4, generator=g),
        control_hidden_states_scale=torch.tensor([1.0, 0.6]),
    )


def _run_transformer(model, inputs):
    with torch.no_grad():
        return model(**{k: v.to(model.dtype) if v.is_floating_point() else v for k, v in inputs.items()}).sample.float()


def _diffusers_reload(module, folder: Path):
    """The reference: the module saved in the diffusers / transformers layout and loaded back."""
    module.save_pretrained(str(folder))
    return type(module).from_pretrained(str(folder)).eval()


@pytest.fixture(scope="module")
def tiny_transformer():
    return tw.build_tiny_transformer(tw.tiny_transformer_config(), seed=3)


@pytest.fixture(scope="module")
def tiny_vae():
    return tw.build_tiny_vae(seed=4)


@pytest.fixture(scope="module")
def tiny_umt5():
    return tw.build_tiny_umt5(seed=5)


# --------------------------------------------------------------------------- transformer


def test_builder_writes_wan_names_and_shapes(tiny_transformer, tmp_path):
    path = tw.write_wan_transformer(tiny_transformer, tmp_path / "diffusion_pytorch_model.safetensors")
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        stored = {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}  # noqa: SIM118
    config = transformer_config({k: ("F32", v) for k, v in stored.items()})
    assert stored == expected_transformer_shapes(config)
    assert set(REAL_TRANSFORMER_NAMES) <= set(stored)
    assert "vace_blocks.1.before_proj.weight" not in stored  # only the first VACE block projects its input


def test_wan_release_layout_with_its_config_json(tmp_path):
    # Wan's release folder: bare names + Wan's config.json, here with 32-wide heads that only
    # config.json can tell.
    model = tw.build_tiny_transformer(tw.tiny_transformer_config(dim=64, heads=2), seed=11)
    path = tw.write_wan_transformer(model, tmp_path / "wan" / "diffusion_pytorch_model.safetensors", wan_config=True)
    reference = _diffusers_reload(model, tmp_path / "ref")
    loaded = files.load_transformer_file(path.parent)  # the release folder works as well as the file
    assert type(loaded) is type(reference)
    assert loaded.config.num_attention_heads == 2 and loaded.config.vace_layers == [0, 1]
    inputs = _transformer_inputs(model.config)
    torch.testing.assert_close(_run_transformer(loaded, inputs), _run_transformer(reference, inputs))


@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16", "fp8", "fp8_scaled"])
def test_comfy_single_file_matches_diffusers_layout(tiny_transformer, tmp_path, precision):
    path = tw.write_wan_transformer(
        tiny_transformer, tmp_path / f"wan2.1_vace_1.3B_{precision}.safetensors", layout="comfy", precision=precision
    )
    reference = _diffusers_reload(tw.reference_weights(tiny_transformer, precision), tmp_path / "ref")
    loaded = files.load_transformer_file(path, dtype=torch.float32)
    inputs = _transformer_inputs(tiny_transformer.config)
    expected = _run_transformer(reference, inputs)
    torch.testing.assert_close(_run_transformer(loaded, inputs), expected, rtol=1e-5, atol=1e-5)
    # Sanity: storage precision matters, so a loader ignoring fp8 scales could not pass.
    if precision == "fp8_scaled":
        raw = _run_transformer(tiny_transformer, inputs)
        assert not torch.allclose(raw, expected, atol=1e-4)


def test_dtype_follows_the_diffusers_loader_policy_not_the_file(tiny_transformer, tmp_path):
    fp16 = tw.write_wan_transformer(tiny_transformer, tmp_path / "a.safetensors", layout="comfy", precision="fp16")
    fp8 = tw.write_wan_transformer(tiny_transformer, tmp_path / "b.safetensors", layout="comfy", precision="fp8")
    # On the CPU the diffusers-layout loader computes in fp32; so do single files, whatever they store.
    assert files.load_transformer_file(fp16).proj_out.weight.dtype == torch.float32
    assert files.load_transformer_file(fp8).proj_out.weight.dtype == torch.float32
    bf16 = files.load_transformer_file(fp8, dtype="bf16")
    assert bf16.proj_out.weight.dtype == torch.bfloat16
    assert bf16.scale_shift_table.dtype == torch.float32  # diffusers keeps it in fp32 for any dtype, so do we
    with pytest.raises(WeightsError, match="unknown dtype 'fp4'"):
        files.load_transformer_file(fp8, dtype="fp4")


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_half_precision_layout_matches_from_pretrained(tiny_transformer, tmp_path, precision):
    from diffusers import WanVACETransformer3DModel

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    path = tw.write_wan_transformer(tiny_transformer, tmp_path / "m.safetensors", precision=precision)
    tw.reference_weights(tiny_transformer, precision).save_pretrained(str(tmp_path / "ref"))
    reference = WanVACETransformer3DModel.from_pretrained(str(tmp_path / "ref"), torch_dtype=dtype)
    loaded = files.load_transformer_file(path, dtype=dtype)
    ref_dtypes = {n: t.dtype for n, t in [*reference.named_parameters(), *reference.named_buffers()]}
    got_dtypes = {n: t.dtype for n, t in [*loaded.named_parameters(), *loaded.named_buffers()]}
    assert got_dtypes == ref_dtypes
    assert got_dtypes["blocks.0.scale_shift_table"] == torch.float32  # kept in fp32 like from_pretrained
    ref_state, got_state = reference.state_dict(), loaded.state_dict()
    assert all(torch.equal(got_state[k], ref_state[k]) for k in ref_state)  # bit for bit
    inputs = _transformer_inputs(tiny_transformer.config)
    # Same weights; CPU GEMM blocking may still differ by an ulp of the compute dtype.
    ulp = {"fp16": 2e-3, "bf16": 2e-2}[precision]
    torch.testing.assert_close(_run_transformer(loaded, inputs), _run_transformer(reference, inputs),
                               rtol=ulp, atol=ulp)


@pytest.mark.parametrize(("size", "dim", "layers", "vace"), [("1.3B", 1536, 30, 15), ("14B", 5120, 40, 8)])
def test_real_sizes_are_detected_from_shapes_alone(size, dim, layers, vace):
    shipped = load_json(TRANSFORMER_CONFIG_DIRS[size] / "config.json")
    shapes = {"model.diffusion_model." + k: ("F16", v) for k, v in expected_transformer_shapes(shipped).items()}
    identity = identify(shapes)
    assert (identity.kind, identity.size, identity.prefix) == ("wan-vace", size, "model.diffusion_model.")
    assert identity.details == {"dim": dim, "num_layers": layers, "in_dim": 16, "vace_layers": vace}
    bare = {k.removeprefix("model.diffusion_model."): v for k, v in shapes.items()}
    assert transformer_config(bare) == shipped


def _without(path: Path, out: Path, drop) -> Path:
    from safetensors.torch import load_file, save_file

    state = load_file(str(path))
    save_file({k: v for k, v in state.items() if not drop(k)}, str(out))
    return out


def test_plain_wan_t2v_is_refused(tiny_transformer, tmp_path):
    full = tw.write_wan_transformer(tiny_transformer, tmp_path / "full.safetensors", layout="comfy")
    t2v = _without(full, tmp_path / "wan2.1_t2v_1.3B_fp16.safetensors", lambda k: ".vace_" in k)
    with pytest.raises(WeightsError) as info:
        files.load_transformer_file(t2v)
    message = str(info.value)
    assert "wan2.1_t2v_1.3B_fp16.safetensors" in message
    assert "plain Wan" in message and "text-to-video" in message and "Wan2.1-VACE" in message


def test_vace_module_only_is_refused(tiny_transformer, tmp_path):
    full = tw.write_wan_transformer(tiny_transformer, tmp_path / "full.safetensors")
    module = _without(full, tmp_path / "Wan2_1-VACE_module.safetensors", lambda k: not k.startswith("vace"))
    with pytest.raises(WeightsError, match="VACE module only"):
        files.load_transformer_file(module)


def test_vae_given_as_transformer_is_refused(tiny_vae, tmp_path):
    vae = tw.write_wan_vae(tiny_vae, tmp_path / "wan_2.1_vae.safetensors")
    with pytest.raises(WeightsError) as info:
        files.load_transformer_file(vae)
    assert "wan_2.1_vae.safetensors" in str(info.value)
    assert "Wan VAE" in str(info.value) and "vae/ folder" in str(info.value)


def test_truncated_transformer_is_refused(tiny_transformer, tmp_path):
    full = tw.write_wan_transformer(tiny_transformer, tmp_path / "full.safetensors")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(WeightsError, match="truncated"):
        files.load_transformer_file(cut)


def test_incomplete_transformer_names_missing_tensors(tiny_transformer, tmp_path):
    full = tw.write_wan_transformer(tiny_transformer, tmp_path / "full.safetensors")
    broken = _without(full, tmp_path / "broken.safetensors", lambda k: k == "blocks.1.cross_attn.k.weight")
    with pytest.raises(WeightsError, match=r"missing 1 tensors \(blocks\.1\.cross_attn\.k\.weight\)"):
        files.load_transformer_file(broken)


# --------------------------------------------------------------------------- VAE


def test_vae_builder_writes_wan_names(tiny_vae):
    state = {tw.diffusers_to_wan_vae_key(k): tuple(v.shape) for k, v in tiny_vae.state_dict().items()}
    assert state == expected_vae_shapes(vae_config({k: ("F32", v) for k, v in state.items()}))
    assert set(REAL_VAE_NAMES) <= set(state)


@pytest.mark.parametrize("name", ["Wan2.1_VAE.pth", "wan_2.1_vae.safetensors"])
def test_vae_files_match_diffusers_layout(tiny_vae, tmp_path, name):
    path = tw.write_wan_vae(tiny_vae, tmp_path / name)
    reference = _diffusers_reload(tiny_vae, tmp_path / "ref")
    loaded = files.load_vae_file(path)
    assert type(loaded) is type(reference) and loaded.dtype == torch.float32
    video = torch.rand(1, 3, 5, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        mean = loaded.encode(video).latent_dist.mean
        torch.testing.assert_close(mean, reference.encode(video).latent_dist.mean)
        torch.testing.assert_close(loaded.decode(mean).sample, reference.decode(mean).sample)


def test_transformer_given_as_vae_is_refused(tiny_transformer, tmp_path):
    path = tw.write_wan_transformer(tiny_transformer, tmp_path / "wan2.1_vace_1.3B_fp16.safetensors", layout="comfy")
    with pytest.raises(WeightsError, match=r"expected the Wan 2\.1 VAE.*holds Wan2\.1-VACE"):
        files.load_vae_file(path)


# --------------------------------------------------------------------------- umT5


def _encode(model, tokenizer, prompts=PROMPTS):
    batch = tokenizer(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state.float()
    return out * batch.attention_mask[..., None]


def test_umt5_hf_folder(tiny_umt5, tmp_path):
    model, tokenizer, _ = tiny_umt5
    model.save_pretrained(str(tmp_path / "umt5-xxl"))
    tokenizer.save_pretrained(str(tmp_path / "umt5-xxl"))
    loaded, tok = files.load_text_encoder(tmp_path / "umt5-xxl")
    assert type(loaded) is type(model)
    assert tok(PROMPTS[0]).input_ids == tokenizer(PROMPTS[0]).input_ids
    torch.testing.assert_close(_encode(loaded, tok), _encode(model, tokenizer))


def test_umt5_wan_pth_with_tokenizer_folder(tiny_umt5, tmp_path):
    model, tokenizer, _ = tiny_umt5
    pth = tw.write_umt5_wan(model, tokenizer, tmp_path / "Wan2.1-VACE-1.3B", precision="fp32")
    assert (pth.parent / "google" / "umt5-xxl").is_dir()
    reference = _diffusers_reload(model, tmp_path / "ref")
    loaded, tok = files.load_text_encoder(pth)
    torch.testing.assert_close(_encode(loaded, tok), _encode(reference, tokenizer))


def test_wan_t5_names_map_onto_transformers_names(tiny_umt5):
    model, _, _ = tiny_umt5
    state = model.state_dict()
    wan = {"token_embedding.weight": state["shared.weight"], "norm.weight": state["encoder.final_layer_norm.weight"],
           "blocks.1.ffn.gate.0.weight": state["encoder.block.1.layer.1.DenseReluDense.wi_0.weight"],
           "blocks.1.ffn.fc1.weight": state["encoder.block.1.layer.1.DenseReluDense.wi_1.weight"],
           "blocks.0.pos_embedding.embedding.weight":
               state["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]}
    out = wan_t5_to_transformers(wan)
    assert out["encoder.embed_tokens.weight"] is wan["token_embedding.weight"]
    assert out["encoder.block.1.layer.1.DenseReluDense.wi_0.weight"] is wan["blocks.1.ffn.gate.0.weight"]
    assert out["encoder.block.1.layer.1.DenseReluDense.wi_1.weight"] is wan["blocks.1.ffn.fc1.weight"]
    with pytest.raises(KeyError):
        wan_t5_to_transformers({"blocks.0.attn.qkv.weight": torch.zeros(1)})


def test_umt5_comfy_fp16_with_embedded_tokenizer(tiny_umt5, tmp_path):
    import sentencepiece as spm

    model, tokenizer, proto = tiny_umt5
    path = tw.write_umt5_comfy(model, proto, tmp_path / "umt5_xxl_fp16.safetensors", precision="fp16")
    loaded, tok = files.load_text_encoder(path, dtype="fp16", cast_per_layer=False)
    assert loaded.shared.weight.dtype == torch.float16
    assert loaded.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype == torch.float32  # as from_pretrained
    processor = spm.SentencePieceProcessor(model_proto=proto)
    for text in [*PROMPTS, "一只猫在草地上奔跑"]:
        assert tok(text).input_ids == [*processor.encode(text), 1]  # ComfyUI: spm ids, then </s>, no BOS
    reference = _diffusers_reload(tw.reference_weights(model, "fp16"), tmp_path / "ref")
    loaded32, tok32 = files.load_text_encoder(path)  # CPU default: fp32
    torch.testing.assert_close(_encode(loaded32, tok32), _encode(reference, tokenizer))


def test_umt5_comfy_scaled_fp8_dequantizes_close_to_source(tiny_umt5, tmp_path):
    model, tokenizer, proto = tiny_umt5
    path = tw.write_umt5_comfy(model, proto, tmp_path / "umt5_xxl_fp8_e4m3fn_scaled.safetensors",
                               precision="fp8_scaled")
    loaded, tok = files.load_text_encoder(path, dtype=torch.float32, cast_per_layer=False)  # dequantized whole
    source = model.state_dict()
    name = "encoder.block.1.layer.1.DenseReluDense.wo.weight"
    got, want = loaded.state_dict()[name], source[name]
    scale = want.abs().max() / 448.0
    # e4m3 keeps 3 mantissa bits: within 1/16 relative, or the subnormal step for tiny values.
    assert torch.all((got - want).abs() <= want.abs() / 16 + scale * 2.0**-9)
    assert (got - want).abs().max() > 0  # it really went through fp8
    out, ref = _encode(loaded, tok), _encode(model, tokenizer)
    assert (out - ref).norm() / ref.norm() < 0.1


def test_umt5_wan_pth_without_tokenizer_folder_is_refused(tiny_umt5, tmp_path):
    model, tokenizer, _ = tiny_umt5
    pth = tw.write_umt5_wan(model, tokenizer, tmp_path / "release")
    lonely = tmp_path / "elsewhere" / pth.name
    lonely.parent.mkdir()
    lonely.write_bytes(pth.read_bytes())
    with pytest.raises(WeightsError, match=r"no embedded tokenizer.*pass tokenizer=FOLDER"):
        files.load_text_encoder(lonely)
    _, tok = files.load_text_encoder(lonely, tokenizer=pth.parent / "google" / "umt5-xxl")
    assert tok(PROMPTS[0]).input_ids == tokenizer(PROMPTS[0]).input_ids


def test_plain_t5_and_vae_are_refused_as_text_encoder(tiny_umt5, tiny_vae, tmp_path):
    from safetensors.torch import save_file

    model, _, _ = tiny_umt5
    t5 = {k: v for k, v in model.state_dict().items()
          if not (k.startswith("encoder.block.1.") and "relative_attention_bias" in k)}
    save_file({k: v.clone() for k, v in t5.items()}, str(tmp_path / "t5xxl_fp16.safetensors"))
    with pytest.raises(WeightsError, match=r"T5-XXL .*not umT5-XXL"):
        files.load_text_encoder(tmp_path / "t5xxl_fp16.safetensors")
    vae = tw.write_wan_vae(tiny_vae, tmp_path / "Wan2.1_VAE.pth")
    with pytest.raises(WeightsError, match=r"Wan2\.1_VAE\.pth: expected the umT5-XXL text encoder"):
        files.load_text_encoder(vae)


# --------------------------------------------------------------------------- all three


def test_load_vace_from_files_comfy_models_folder(tmp_path):
    paths = tw.build_tiny_comfy_models_dir(tmp_path / "models")
    models = files.load_vace_from_files(paths["transformer"], paths["vae"], paths["text_encoder"], device="cpu")
    assert isinstance(models, VaceModels)
    assert type(models.transformer).__name__ == "WanVACETransformer3DModel"
    assert type(models.vae).__name__ == "AutoencoderKLWan"
    assert type(models.text_encoder).__name__ == "UMT5EncoderModel"
    # Stored fp16 / fp8, computed as the diffusers loader would on this CPU: fp32.
    assert models.dtype == models.transformer.dtype == models.vae.dtype == torch.float32
    # The embedding (fp16) and fp8 matrices stay as stored; each layer computes in fp32 (test_stored_precision).
    assert models.text_encoder.shared.weight.dtype == torch.float16
    assert "cast per layer" in models.origin["text_encoder"] and "cast per layer" in models.origin["transformer"]
    assert models.scheduler_config["_class_name"] == "UniPCMultistepScheduler"
    assert "wan2.1_vace_1.3B_fp16.safetensors" in models.origin["transformer"]
    assert "Comfy-Org layout" in models.origin["transformer"]
    assert "scaled fp8" in models.origin["text_encoder"]
    embedded = models.tokenizer(PROMPTS[0]).input_ids
    assert embedded[-1] == 1 and len(embedded) > 3


def test_shipped_configs_build_the_released_architectures():
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanVACETransformer3DModel

    small = load_json(TRANSFORMER_CONFIG_DIRS["1.3B"] / "config.json")
    assert small["num_attention_heads"] * small["attention_head_dim"] == 1536
    assert small["vace_layers"] == list(range(0, 30, 2))
    with torch.device("meta"):
        assert WanVACETransformer3DModel.from_config(small).config.num_layers == 30
        assert AutoencoderKLWan.from_config(load_json(files.SCHEDULER_CONFIG_DIR.parent / "wan2.1-vae" /
                                                      "config.json")).config.z_dim == 16
    scheduler = UniPCMultistepScheduler.from_config(files.scheduler_config())
    assert scheduler.config.prediction_type == "flow_prediction" and scheduler.config.use_flow_sigmas
    assert json.loads((files.SCHEDULER_CONFIG_DIR.parent / "umt5-xxl-encoder" / "config.json").read_text())[
        "model_type"] == "umt5"


def test_sharded_release_and_full_checkpoint_prefix(tiny_transformer, tmp_path):
    from safetensors.torch import load_file, save_file

    single = tw.write_wan_transformer(tiny_transformer, tmp_path / "single.safetensors")
    state = load_file(str(single))
    names = sorted(state)
    # Wan's 14B release is sharded with an index, as diffusers/transformers shard files.
    release = tmp_path / "Wan2.1-VACE-14B"
    release.mkdir()
    halves = {"diffusion_pytorch_model-00001-of-00002.safetensors": names[::2],
              "diffusion_pytorch_model-00002-of-00002.safetensors": names[1::2]}
    for shard, keys in halves.items():
        save_file({k: state[k] for k in keys}, str(release / shard))
    index = {"metadata": {}, "weight_map": {k: shard for shard, keys in halves.items() for k in keys}}
    (release / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    # A full ComfyUI checkpoint: the transformer behind the prefix, other models beside it.
    full = {f"model.diffusion_model.{k}": v for k, v in state.items()}
    full["first_stage_model.decoder.conv1.weight"] = torch.zeros(4, 4, 3, 3, 3)
    full["text_encoders.umt5xxl.transformer.shared.weight"] = torch.zeros(8, 4)
    save_file(full, str(tmp_path / "checkpoint.safetensors"))

    inputs = _transformer_inputs(tiny_transformer.config)
    expected = _run_transformer(tiny_transformer, inputs)
    for source in (release, tmp_path / "checkpoint.safetensors"):
        torch.testing.assert_close(_run_transformer(files.load_transformer_file(source), inputs), expected)


def test_inspect_file_says_what_a_file_is(tiny_transformer, tiny_vae, tmp_path):
    transformer = tw.write_wan_transformer(tiny_transformer, tmp_path / "t.safetensors", layout="comfy",
                                           precision="fp8_scaled")
    identity = files.inspect_file(transformer)
    assert (identity.kind, identity.prefix, identity.dtype) == ("wan-vace", "model.diffusion_model.", "F8_E4M3")
    assert identity.summary.startswith("Wan2.1-VACE custom size (width 128, 2 layers)")
    vae = files.inspect_file(tw.write_wan_vae(tiny_vae, tmp_path / "Wan2.1_VAE.pth"))
    assert (vae.kind, vae.summary, vae.details["z_dim"]) == ("wan-vae", "Wan VAE", 16)


def test_single_files_match_the_diffusers_folder_loader(tmp_path):
    """The team's tiny diffusers folder, re-written as Comfy-Org / ComfyUI single files, loads to the
    same numbers through load_vace_from_files as through load_vace_diffusers."""
    from unison_runtime.testing.tiny_wan import build_tiny_vace_diffusers
    from unison_runtime.vace.loading import load_vace_diffusers

    folder = build_tiny_vace_diffusers(tmp_path / "Wan2.1-VACE-1.3B-diffusers", seed=4)
    reference = load_vace_diffusers(folder, device="cpu")
    transformer = tw.write_wan_transformer(reference.transformer, tmp_path / "vace.safetensors", layout="comfy")
    proto = (folder / "tokenizer" / "spiece.model").read_bytes()
    encoder = tw.write_umt5_comfy(reference.text_encoder, proto, tmp_path / "umt5.safetensors", precision="fp32")
    vae = tw.write_wan_vae(tw.build_tiny_vae(seed=1), tmp_path / "wan_2.1_vae.safetensors")  # Wan's VAE geometry
    heads = reference.transformer.config.num_attention_heads  # 16-wide heads: not Wan's 128, so say it
    models = files.load_vace_from_files(transformer, vae, encoder, device="cpu", num_heads=heads)

    assert (models.device, models.text_device, models.dtype) == (reference.device, reference.text_device,
                                                                 reference.dtype)
    def public(cfg):
        return {k: v for k, v in dict(cfg).items() if not k.startswith("_")}

    assert public(models.transformer.config) == public(reference.transformer.config)  # read from the weights
    config = reference.transformer.config
    g = torch.Generator().manual_seed(3)
    inputs = dict(
        hidden_states=torch.randn(1, config.in_channels, 2, 4, 4, generator=g), timestep=torch.tensor([500]),
        encoder_hidden_states=torch.randn(1, 5, config.text_dim, generator=g),
        control_hidden_states=torch.randn(1, config.vace_in_channels, 2, 4, 4, generator=g),
        control_hidden_states_scale=torch.ones(len(config.vace_layers)),
    )
    torch.testing.assert_close(_run_transformer(models.transformer, inputs),
                               _run_transformer(reference.transformer, inputs))
    text = "the quick brown fox jumps over the lazy dog"
    assert models.tokenizer(text).input_ids == reference.tokenizer(text).input_ids
    torch.testing.assert_close(_encode(models.text_encoder, models.tokenizer, [text]),
                               _encode(reference.text_encoder, reference.tokenizer, [text]))


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_umt5_file_dtypes_and_tied_embedding_match_from_pretrained(tiny_umt5, tmp_path, precision):
    from transformers import UMT5EncoderModel

    model, _, proto = tiny_umt5
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    path = tw.write_umt5_comfy(model, proto, tmp_path / "umt5_xxl_fp16.safetensors", precision="fp16")
    tw.reference_weights(model, "fp16").save_pretrained(str(tmp_path / "ref"))
    reference = UMT5EncoderModel.from_pretrained(str(tmp_path / "ref"), dtype=dtype)
    loaded, _ = files.load_text_encoder(path, dtype=precision, cast_per_layer=False)  # converted as from_pretrained
    assert {n: p.dtype for n, p in loaded.named_parameters()} == {n: p.dtype for n, p in reference.named_parameters()}
    ref_state, got_state = reference.state_dict(), loaded.state_dict()
    assert ref_state.keys() == got_state.keys()
    assert all(torch.equal(got_state[k], ref_state[k]) for k in ref_state)
    # One embedding, as in transformers: the encoder's lookup table is the shared one, not a copy.
    assert loaded.encoder.embed_tokens.weight.data_ptr() == loaded.shared.weight.data_ptr()


def test_umt5_wan_bf16_pth_converts_to_fp32_on_the_cpu(tiny_umt5, tmp_path):
    model, tokenizer, _ = tiny_umt5
    pth = tw.write_umt5_wan(model, tokenizer, tmp_path / "Wan2.1-VACE-1.3B", precision="bf16")
    reference = _diffusers_reload(tw.reference_weights(model, "bf16"), tmp_path / "ref")
    loaded, tok = files.load_text_encoder(pth, cast_per_layer=False)  # CPU default: fp32, converted tensor by tensor
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}
    ref_state, got_state = reference.state_dict(), loaded.state_dict()
    assert all(torch.equal(got_state[k], ref_state[k]) for k in ref_state)
    torch.testing.assert_close(_encode(loaded, tok), _encode(reference, tokenizer))


def test_umt5_folder_with_only_a_pickle_is_refused_unread(tiny_umt5, tmp_path):
    model, tokenizer, _ = tiny_umt5
    folder = tmp_path / "umt5-xxl"
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    (folder / "model.safetensors").unlink()
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    with pytest.raises(WeightsError, match=r"model\.safetensors .* is missing \(found pytorch_model\.bin: only "
                                           r"safetensors are loaded\)"):
        files.load_text_encoder(folder)
