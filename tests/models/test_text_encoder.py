"""The frozen umT5 wrapper against a direct run of the encoder the way diffusers' WanPipeline does it (padding to
512, zeroing past the real tokens), on a tiny random UMT5EncoderModel and a locally built Unigram tokenizer; and the
released Wan layout (``models_t5_umt5-xxl-enc-bf16.pth`` + ``google/umt5-xxl/``) against golden outputs of VideoX-Fun's
own encoder at a tiny size (tests/fixtures/wan_encoders, made by its make_fixtures.py)."""

import json
import os
import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")

from loom.models import text_encoder as te  # noqa: E402
from tests.models.contract import FrozenEncoderContract  # noqa: E402

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "fixtures", "wan_encoders")
WORDS = "a 3d object of the red blue chair car cat on turntable video 360-degree rotating".split()


def save_tiny_tokenizer(path) -> str:
    """A umT5-like tokenizer (Unigram, metaspace, </s> appended, <pad> = 0) built offline and saved locally."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [("▁" + w, -1.0 - 0.01 * i) for i, w in enumerate(WORDS)]
    vocab += [(ch, -5.0) for ch in "abcdefghijklmnopqrstuvwxyz0123456789-_&;"]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="always", split=True)])
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tok.post_processor = processors.TemplateProcessing(single=["$A", "</s>"], special_tokens=[("</s>", 1)])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>",
                                                unk_token="<unk>")
    fast.save_pretrained(str(path))
    return str(path)


def save_tiny_umt5(path, tokenizer_dir=None, seed: int = 0) -> str:
    """A tiny random UMT5EncoderModel (d_model 32, 2 layers) saved to ``path`` (with its tokenizer there too unless
    ``tokenizer_dir`` is given)."""
    vocab = 4 + len(WORDS) + 40
    cfg = transformers.UMT5Config(vocab_size=vocab, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                  relative_attention_num_buckets=8, relative_attention_max_distance=16)
    torch.manual_seed(seed)
    transformers.UMT5EncoderModel(cfg).save_pretrained(str(path))
    save_tiny_tokenizer(tokenizer_dir or path)
    return str(path)


def wan_reference(enc_dir, tok_dir, prompts, max_length=512):
    """diffusers 0.42.1 WanPipeline._get_t5_prompt_embeds, minus the pipeline: (B, max_length, D), zeros past the
    real tokens, and the real token counts."""
    tok = transformers.AutoTokenizer.from_pretrained(tok_dir)
    model = transformers.UMT5EncoderModel.from_pretrained(enc_dir).eval()
    t = tok([te.prompt_clean(p) for p in prompts], padding="max_length", max_length=max_length, truncation=True,
            add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
    seq_lens = t.attention_mask.gt(0).sum(dim=1).long()
    with torch.no_grad():
        h = model(t.input_ids, t.attention_mask).last_hidden_state
    h = [u[:v] for u, v in zip(h, seq_lens, strict=True)]
    return torch.stack([torch.cat([u, u.new_zeros(max_length - u.size(0), u.size(1))]) for u in h]), seq_lens


def test_prompt_clean_is_wans():
    assert te.prompt_clean("  a  red\n\tchair &amp;amp; car ") == "a red chair & car"
    wan = pytest.importorskip("diffusers.pipelines.wan.pipeline_wan")
    for text in ["  a  red\n\tchair &amp;amp; car ", "caf\u00e9 &lt;b&gt;", "x\u00a0\u2003y", ""]:
        assert te.prompt_clean(text) == wan.prompt_clean(text)


def test_encode_matches_wan_and_is_trimmed(tmp_path):
    d = save_tiny_umt5(tmp_path / "enc")
    enc = te.load_text_encoder(d)
    assert (enc.dim, enc.max_length) == (32, 512)
    assert not any(p.requires_grad for p in enc.parameters())
    prompts = ["a red chair", "a  blue car on a turntable video, rotating 360-degree", "cat"]
    got = enc.encode(prompts)
    ref, lens = wan_reference(d, d, prompts)
    assert [g.shape for g in got] == [(int(n), 32) for n in lens]
    assert len({g.shape[0] for g in got}) == 3  # different lengths: trimmed, not padded to the batch's longest
    for g, r, n in zip(got, ref, lens, strict=True):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, r[:n], rtol=1e-5, atol=1e-5)
        assert r[n:].abs().sum() == 0  # what Wan pads with, and what a consumer must pad with
    # A prompt's features do not depend on the other prompts of its batch.
    torch.testing.assert_close(enc.encode([prompts[2]])[0], got[2], rtol=1e-5, atol=1e-5)
    assert enc.count_tokens(prompts) == [int(n) for n in lens]


def test_truncates_to_max_length(tmp_path):
    d = save_tiny_umt5(tmp_path / "enc")
    enc = te.load_text_encoder(d, max_length=6)
    long = "a red chair on a blue car on a cat"
    (z,) = enc.encode([long])
    assert z.shape == (6, 32) and enc.count_tokens([long])[0] > 6
    ref, _ = wan_reference(d, d, [long], max_length=6)
    torch.testing.assert_close(z, ref[0], rtol=1e-5, atol=1e-5)


def test_checkpoint_layout_and_missing_dirs(tmp_path):
    root = tmp_path / "wan"
    save_tiny_umt5(root / "text_encoder", tokenizer_dir=root / "tokenizer")
    # A Wan checkpoint root, its text_encoder subfolder (tokenizer found as the sibling) and explicit folders.
    assert te.resolve_text_dirs(str(root)) == (str(root / "text_encoder"), str(root / "tokenizer"))
    assert te.resolve_text_dirs(str(root / "text_encoder"))[1] == os.path.abspath(root / "tokenizer")
    assert te.resolve_text_dirs(str(root / "text_encoder"), str(root / "tokenizer"))[1] == str(root / "tokenizer")
    assert te.load_text_encoder(str(root)).encode(["a cat"])[0].shape == (3, 32)  # ▁a ▁cat </s>
    with pytest.raises(FileNotFoundError, match="no-such-umt5"):
        te.load_text_encoder(str(tmp_path / "no-such-umt5"))
    with pytest.raises(FileNotFoundError, match="no-such-tok"):
        te.resolve_text_dirs(str(root), str(tmp_path / "no-such-tok"))
    (tmp_path / "lonely").mkdir()
    save_tiny_umt5(tmp_path / "lonely" / "enc", tokenizer_dir=tmp_path / "elsewhere")
    with pytest.raises(FileNotFoundError, match="tokenizer=DIR"):
        te.resolve_text_dirs(str(tmp_path / "lonely" / "enc"))


def golden():
    from safetensors.torch import load_file

    with open(os.path.join(FIXTURES, "inputs.json")) as f:
        return json.load(f), load_file(os.path.join(FIXTURES, "golden.safetensors"))


def released_state_dict() -> dict:
    return torch.load(os.path.join(FIXTURES, te.RELEASED_FILE), weights_only=True)


def wan_umt5_shapes(vocab, dim, heads, head_dim, ffn, layers, buckets) -> dict:
    """Wan's umT5 encoder keys and shapes (wan/modules/t5.py, shared_pos=False), as meta tensors."""
    shapes = {"token_embedding.weight": (vocab, dim), "norm.weight": (dim,)}
    for i in range(layers):
        b = f"blocks.{i}."
        shapes |= {b + "norm1.weight": (dim,), b + "norm2.weight": (dim,),
                   b + "pos_embedding.embedding.weight": (buckets, heads), b + "ffn.gate.0.weight": (ffn, dim),
                   b + "ffn.fc1.weight": (ffn, dim), b + "ffn.fc2.weight": (dim, ffn)}
        shapes |= {b + f"attn.{n}.weight": (heads * head_dim, dim) for n in "qkv"}
        shapes[b + "attn.o.weight"] = (dim, heads * head_dim)
    return {k: torch.empty(v, device="meta") for k, v in shapes.items()}


@pytest.mark.parametrize("form", ["root", "pth", "pth+tokenizer"])
def test_released_pth_matches_upstream_videox_fun(form):
    """The tiny released-layout file through Loom's reader gives what VideoX-Fun's WanT5EncoderModel gave (padding to
    512, attention mask, first seq_len rows), for short prompts and one truncated at 512 tokens."""
    inputs, gold = golden()
    pth, tok_dir = os.path.join(FIXTURES, te.RELEASED_FILE), os.path.join(FIXTURES, "google", "umt5-xxl")
    path, tok = {"root": (FIXTURES, None), "pth": (pth, None), "pth+tokenizer": (pth, tok_dir)}[form]
    enc_path, tok_path = te.resolve_text_dirs(path, tok)
    assert os.path.samefile(enc_path, pth) and os.path.samefile(tok_path, tok_dir)
    enc = te.load_text_encoder(path, tokenizer=tok)
    assert (enc.dim, enc.max_length, type(enc.encoder).__name__) == (32, 512, "UMT5EncoderModel")
    assert not any(p.requires_grad for p in enc.parameters())
    prompts = inputs["prompts"]
    # VideoX-Fun passes raw prompts and Loom cleans them: the fixture's prompts are ones cleaning leaves alone.
    assert [te.prompt_clean(p) for p in prompts] == prompts
    got = enc.encode(prompts)
    for i, g in enumerate(got):
        ids = enc.tokenizer(prompts[i], truncation=True, max_length=512)["input_ids"]
        assert ids == gold[f"text_ids.{i}"].tolist()
        assert g.dtype == torch.float32 and g.shape == gold[f"text.{i}"].shape
        torch.testing.assert_close(g, gold[f"text.{i}"], rtol=1e-5, atol=2e-5)
    assert got[3].shape[0] == 512 and enc.count_tokens(prompts)[3] > 512  # truncated as upstream truncates
    assert gold["text.0"].abs().max() > 0.1  # the golden rows are not (near) zeros


def test_released_pth_weights_and_bf16():
    """Every tensor of the file lands unchanged (bf16 -> float32 is exact) where the mapping says; bfloat16 keeps
    them as they are stored and still matches upstream to bf16 precision."""
    sd = released_state_dict()
    enc = te.load_text_encoder(FIXTURES).encoder
    blk = enc.encoder.block[1].layer
    att, ffn = blk[0].SelfAttention, blk[1].DenseReluDense
    pairs = [("token_embedding.weight", enc.shared.weight), ("token_embedding.weight", enc.encoder.embed_tokens.weight),
             ("norm.weight", enc.encoder.final_layer_norm.weight), ("blocks.1.norm1.weight", blk[0].layer_norm.weight),
             ("blocks.1.attn.k.weight", att.k.weight), ("blocks.1.attn.o.weight", att.o.weight),
             ("blocks.1.pos_embedding.embedding.weight", att.relative_attention_bias.weight),
             ("blocks.1.norm2.weight", blk[1].layer_norm.weight), ("blocks.1.ffn.gate.0.weight", ffn.wi_0.weight),
             ("blocks.1.ffn.fc1.weight", ffn.wi_1.weight), ("blocks.1.ffn.fc2.weight", ffn.wo.weight)]
    for k, p in pairs:
        assert p.dtype == torch.float32 and torch.equal(p, sd[k].float()), k
    cfg = enc.config
    assert (cfg.d_kv, cfg.num_heads, cfg.d_ff, cfg.num_layers, cfg.relative_attention_num_buckets,
            cfg.relative_attention_max_distance, cfg.dense_act_fn, cfg.is_gated_act) == (8, 4, 48, 2, 32, 128,
                                                                                        "gelu_new", True)
    bf = te.load_text_encoder(FIXTURES, dtype="bfloat16")
    assert bf.dtype == torch.bfloat16
    assert torch.equal(bf.encoder.shared.weight, sd["token_embedding.weight"])
    inputs, gold = golden()
    torch.testing.assert_close(bf.encode(inputs["prompts"][:1])[0], gold["text.0"], rtol=0.05, atol=0.05)


def test_umt5_xxl_config_from_the_released_shapes():
    """umT5-xxl's shapes (no memory: meta tensors) give the config Wan states: d_model 4096, 64 heads x 64, d_ff
    10240, 24 layers, vocab 256384, 32 buckets; and the shape builder agrees with the fixture file's keys."""
    tiny = {k: tuple(v.shape) for k, v in released_state_dict().items()}
    assert {k: tuple(v.shape) for k, v in wan_umt5_shapes(64, 32, 4, 8, 48, 2, 32).items()} == tiny
    cfg, hf = te.umt5_from_wan(wan_umt5_shapes(256384, 4096, 64, 64, 10240, 24, 32))
    assert (cfg.vocab_size, cfg.d_model, cfg.num_heads, cfg.d_kv, cfg.d_ff, cfg.num_layers,
            cfg.relative_attention_num_buckets) == (256384, 4096, 64, 64, 10240, 24, 32)
    assert len(hf) == 2 + 24 * 10


def test_released_pth_refuses_what_is_not_wan_umt5(tmp_path):
    sd = released_state_dict()
    with pytest.raises(ValueError, match=r"lacks 1 weight.*blocks\.1"):
        te.umt5_from_wan({k: v for k, v in sd.items() if k != "blocks.1.ffn.fc2.weight"})
    with pytest.raises(ValueError, match="blocks.0.attn.extra.weight"):
        te.umt5_from_wan(sd | {"blocks.0.attn.extra.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"numbered \[0, 1, 5\]"):
        te.umt5_from_wan(sd | {"blocks.5.norm1.weight": torch.zeros(32)})
    with pytest.raises(ValueError, match=r"disagree.*blocks\.1\.ffn\.fc1\.weight"):
        te.umt5_from_wan(sd | {"blocks.1.ffn.fc1.weight": torch.zeros(40, 32)})
    with pytest.raises(ValueError, match="shared_pos=True"):
        te.umt5_from_wan(sd | {"pos_embedding.embedding.weight": torch.zeros(32, 4)})
    with pytest.raises(ValueError, match="no 'token_embedding.weight'"):
        te.umt5_from_wan({"visual.head": torch.zeros(2, 2)})
    # Files: not a .pth; pickled objects (never unpickled); not a flat state dict.
    (tmp_path / "enc.safetensors").write_bytes(b"x")
    with pytest.raises(ValueError, match="not a .pth"):
        te.resolve_text_dirs(str(tmp_path / "enc.safetensors"))
    tok = os.path.join(FIXTURES, "google", "umt5-xxl")
    torch.save({"token_embedding.weight": torch.zeros(2), "why": os.path.join}, tmp_path / "code.pth")
    with pytest.raises(ValueError, match="weights_only"):
        te.load_text_encoder(str(tmp_path / "code.pth"), tokenizer=tok)
    torch.save({"model": sd}, tmp_path / "nested.pth")
    with pytest.raises(ValueError, match="flat state dict"):
        te.load_text_encoder(str(tmp_path / "nested.pth"), tokenizer=tok)


def test_released_layout_tokenizer_search_and_errors(tmp_path):
    # A lone .pth: no tokenizer beside it nor in google/umt5-xxl -> the error names both and what to pass.
    shutil.copy(os.path.join(FIXTURES, te.RELEASED_FILE), tmp_path)
    with pytest.raises(FileNotFoundError, match=r"google/umt5-xxl.*tokenizer=DIR"):
        te.resolve_text_dirs(str(tmp_path))
    # Tokenizer files in the .pth's own folder are found too.
    for f in os.listdir(os.path.join(FIXTURES, "google", "umt5-xxl")):
        shutil.copy(os.path.join(FIXTURES, "google", "umt5-xxl", f), tmp_path)
    pth = str(tmp_path / te.RELEASED_FILE)
    assert te.resolve_text_dirs(pth) == (pth, str(tmp_path))
    # A released root without the umT5 file still has the DiT's (diffusers) config.json: say what is missing.
    root = tmp_path / "fun"
    root.mkdir()
    (root / "config.json").write_text(json.dumps({"_class_name": "WanTransformer3DModel"}))
    with pytest.raises(FileNotFoundError, match=te.RELEASED_FILE.replace(".", r"\.")):
        te.load_text_encoder(str(root))
    # A tokenizer that does not fit the encoder's embedding table.
    big = save_tiny_tokenizer(tmp_path / "big")
    small = tmp_path / "small"
    small.mkdir()
    torch.save({k: (v[:20] if k == "token_embedding.weight" else v) for k, v in released_state_dict().items()},
               small / te.RELEASED_FILE)
    with pytest.raises(ValueError, match="different models"):
        te.load_text_encoder(str(small), tokenizer=big)


class TestTextEncoderContract(FrozenEncoderContract):
    """Shapes, determinism, save/load and frozen weights (tests/models/contract.py) of the umT5 wrapper; the output
    is the trimmed embeddings of the prompts, joined along the tokens."""

    output_shape = (4 + 3, 32)  # "a red chair": ▁a ▁red ▁chair </s>; "a cat": ▁a ▁cat </s> (seed 1: as many)
    leaves_global_rng = False  # the tiny umT5 is built under torch.manual_seed

    def make_model(self, seed=0):
        path = self.tmp_path / f"umt5-{seed}-{len(list(self.tmp_path.iterdir()))}"
        return te.load_text_encoder(save_tiny_umt5(path, seed=seed))

    def make_inputs(self, seed=0):
        return {"prompts": [["a red chair", "a cat"], ["a blue car", "the cat"]][seed % 2]}

    def forward(self, model, inputs):
        return torch.cat(model.encode(inputs["prompts"]))

    def save(self, model, path):
        model.encoder.save_pretrained(str(path))
        model.tokenizer.save_pretrained(str(path))

    def load(self, model, path):
        return te.load_text_encoder(str(path))
