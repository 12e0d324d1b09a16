"""The method library checked against the paper's equations, computed by hand."""

from __future__ import annotations

import io
import json
import pickle
import math

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from mga import LossConfig, MGAModel, ModelConfig
from mga.artifact import ArtifactError, artifact_id, pack_artifact, unpack_alignment, unpack_artifact, verify_artifact
from mga.fga import aggregate_tokens
from mga.objective import MGAObjective, batch_hard_triplet_loss
from mga.similarity import token_similarity, within_image_token_cosine

TINY = dict(backbone="tf_efficientnetv2_b0", layers=(3, 4), global_dim=32, token_dim=16, num_tokens=4, heads=2)


@pytest.fixture(scope="module")
def tiny_model() -> MGAModel:
    torch.manual_seed(0)
    return MGAModel(ModelConfig(**TINY)).eval()


def images(count: int, size: int = 64, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (count, 3, size, size), dtype=torch.uint8, generator=generator)


def test_fga_matches_hand_computation():
    grid = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]]])  # B=1, N=3, d=2
    centers = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    bias = torch.tensor([0.5, -0.5])
    residual = torch.tensor([[0.1, 0.2], [-0.3, 0.4]])
    tokens = aggregate_tokens(grid, centers, bias, residual)[0]
    for j in range(2):
        total = np.zeros(2)
        for i in range(3):
            x = grid[0, i].numpy()
            logits = [x @ centers[k].numpy() + bias[k].item() for k in range(2)]
            gamma = math.exp(logits[j]) / sum(math.exp(value) for value in logits)  # eq. (1)
            total += gamma * (x - residual[j].numpy())  # eq. (2), before Norm
        expected = total / np.linalg.norm(total)
        np.testing.assert_allclose(tokens[j].numpy(), expected, rtol=1e-5, atol=1e-6)


def test_token_similarity_matches_hand_computation():
    generator = torch.Generator().manual_seed(1)
    tokens_v, tokens_e = torch.randn(1, 3, 4, generator=generator), torch.randn(1, 3, 4, generator=generator)
    tau = 5.0

    def cosine(a, b):
        return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))

    v, e = tokens_v[0].numpy(), tokens_e[0].numpy()
    s = np.array([[cosine(v[i], e[j]) for j in range(3)] for i in range(3)])  # eq. (4)
    relevance = []
    for i in range(3):
        w_e = np.exp(tau * s[i]) / np.exp(tau * s[i]).sum()  # eq. (5)
        w_v = np.exp(tau * s[:, i]) / np.exp(tau * s[:, i]).sum()
        relevance.append(cosine(v[i], w_e @ e) + cosine(e[i], w_v @ v))
    assert token_similarity(tokens_v, tokens_e, tau, "max").item() == pytest.approx(max(relevance), abs=1e-5)  # eq. (6)
    assert token_similarity(tokens_v, tokens_e, tau, "mean").item() == pytest.approx(np.mean(relevance), abs=1e-5)


def test_token_similarity_of_a_set_with_itself():
    orthonormal = torch.eye(4)[:3].unsqueeze(0)  # three orthonormal tokens
    for reduce in ("mean", "max"):
        # Each token's attended vector is itself as tau grows: two cosines of 1.
        assert token_similarity(orthonormal, orthonormal, 50.0, reduce).item() == pytest.approx(2.0, abs=1e-6)
    generator = torch.Generator().manual_seed(2)
    tokens, others = torch.randn(8, 5, 16, generator=generator), torch.randn(8, 5, 16, generator=generator)
    self_score = token_similarity(tokens, tokens, 10.0)
    cross_score = token_similarity(tokens, others, 10.0)
    assert (self_score > cross_score).all()
    assert torch.allclose(token_similarity(tokens, others, 10.0), token_similarity(others, tokens, 10.0), atol=1e-6)


def test_batched_scoring_equals_per_pair_loop(tiny_model):
    with torch.no_grad():
        queries = tiny_model.embed(images(3, seed=1))
        candidates = tiny_model.embed(images(3 * 4, seed=2))
        batched = tiny_model.score_candidates(queries, candidates)
        for q in range(3):
            for n in range(4):
                single = tiny_model.score_pairs(queries.index(torch.tensor([q])), candidates.index(torch.tensor([q * 4 + n])))
                assert batched.score[q, n].item() == pytest.approx(single.score.item(), abs=1e-5)
                assert batched.token_score[q, n].item() == pytest.approx(single.token_score.item(), abs=1e-5)


def test_similarity_matrix_matches_pairs_and_pair_scores_are_symmetric(tiny_model):
    with torch.no_grad():
        embedding = tiny_model.embed(images(5, seed=3))
        matrix = tiny_model.similarity_matrix(embedding)
        first = embedding.index(torch.tensor([1, 4]))
        second = embedding.index(torch.tensor([3, 0]))
        pairs = tiny_model.score_pairs(first, second).score
        swapped = tiny_model.score_pairs(second, first).score
    assert torch.allclose(pairs, swapped, atol=1e-5)
    assert matrix[1, 3].item() == pytest.approx(pairs[0].item(), abs=1e-5)
    assert matrix[4, 0].item() == pytest.approx(pairs[1].item(), abs=1e-5)


@pytest.mark.parametrize("stage2_keys,layer_scale", [("same", 0.0), ("pair", 0.0), ("same", 1e-3)])
def test_every_parameter_gets_a_gradient(stage2_keys, layer_scale):
    torch.manual_seed(0)
    model = MGAModel(ModelConfig(**TINY, stage2_keys=stage2_keys, ata_layer_scale=layer_scale))
    objective = MGAObjective(model, num_classes=3, loss=LossConfig())
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    objective(images(6), labels).total.backward()
    starved = [name for name, parameter in objective.named_parameters() if parameter.grad is None or not parameter.grad.abs().sum() > 0]
    assert starved == []


def test_layer_scale_keeps_the_attended_tokens_of_an_image_apart():
    # Plain pre-norm blocks at init turn an image's tokens into about one vector (the
    # branches swamp the unit-norm tokens); with LayerScale the blocks start near the
    # identity, so the attended tokens are as distinct as the coarse FGA tokens they start from.
    # The measure itself: one repeated token is 1, orthogonal tokens are 0.
    assert within_image_token_cosine(torch.ones(1, 3, 4)).tolist() == pytest.approx([1.0])
    assert within_image_token_cosine(torch.eye(3)[None]).tolist() == pytest.approx([0.0])
    pixels = images(4, seed=2)
    torch.manual_seed(0)
    plain = MGAModel(ModelConfig(**TINY, ata_layer_scale=0.0)).eval()
    torch.manual_seed(0)
    scaled = MGAModel(ModelConfig(**TINY, ata_layer_scale=1e-4)).eval()
    tokens = plain.embed(pixels).tokens
    with torch.no_grad():
        plain_attended, _ = plain.alignment.attend(tokens, [layer.flip(0) for layer in tokens])
        scaled_attended, _ = scaled.alignment.attend(tokens, [layer.flip(0) for layer in tokens])
    coarse = within_image_token_cosine(tokens[-1]).mean().item()
    assert within_image_token_cosine(plain_attended).mean().item() > coarse + 0.02
    assert abs(within_image_token_cosine(scaled_attended).mean().item() - coarse) < 0.01
    assert not plain.state_dict().keys() >= {"alignment.pair_block.gain_attention"}
    assert {"alignment.pair_block.gain_attention", "alignment.detail_blocks.0.gain_mlp"} <= scaled.state_dict().keys()


def test_loss_goes_down_on_a_tiny_batch():
    torch.manual_seed(0)
    objective = MGAObjective(MGAModel(ModelConfig(**TINY)), num_classes=3, loss=LossConfig())
    optimizer = torch.optim.Adam(objective.parameters(), lr=1e-3)
    batch, labels = images(6, seed=4), torch.tensor([0, 0, 1, 1, 2, 2])
    losses = []
    for _ in range(8):
        optimizer.zero_grad()
        parts = objective(batch, labels)
        parts.total.backward()
        optimizer.step()
        losses.append(parts.total.item())
    assert losses[-1] < 0.7 * losses[0], losses


def test_ablation_switches():
    torch.manual_seed(0)
    global_only = MGAModel(ModelConfig(**TINY, alpha=1.0)).eval()
    with torch.no_grad():
        embedding = global_only.embed(images(4))
        # alpha = 1: S is the plain cosine of global features ("normal triplet loss").
        assert torch.allclose(global_only.similarity_matrix(embedding), embedding.global_feature @ embedding.global_feature.t(), atol=1e-6)
    baseline = MGAObjective(global_only, 2, LossConfig(triplet_weight=0.0))
    parts = baseline(images(4), torch.tensor([0, 0, 1, 1]))
    assert parts.triplet.item() == 0.0 and parts.total.item() == pytest.approx(parts.identity.item())
    assert baseline.unused_parameters_possible()


def test_batch_hard_triplet_by_hand():
    similarity = torch.tensor([[1.0, 0.8, 0.3, 0.6], [0.8, 1.0, 0.2, 0.1], [0.3, 0.2, 1.0, 0.9], [0.6, 0.1, 0.9, 1.0]])
    labels = torch.tensor([0, 0, 1, 1])
    # anchor 0: p=0.8, n=max(0.3,0.6)=0.6 -> 0.5-0.8+0.6=0.3; anchor 1: 0.5-0.8+0.2=-0.1 -> 0
    # anchor 2: 0.5-0.9+0.3=-0.1 -> 0; anchor 3: 0.5-0.9+0.6=0.2
    assert batch_hard_triplet_loss(similarity, labels, 0.5).item() == pytest.approx((0.3 + 0.2) / 4)


def test_ata_prepared_once_per_image_scores_each_pair_as_the_pair_alone(tiny_model):
    # A search prepares each image once (mga.ata.PreparedTokens) and scores pairs of prepared rows:
    # the same S_token as ATA on the pairs' own tokens, in whichever batch, for both stage-2
    # modes; LayerScale at 0.5, so that attention moves the scores without making every token one.
    generator = torch.Generator().manual_seed(5)
    queries, gallery = ([torch.nn.functional.normalize(torch.randn(count, 4, 16, generator=generator), dim=-1) for _ in TINY["layers"]] for count in (2, 3))
    query_rows, gallery_rows = torch.tensor([0, 0, 1, 1, 0]), torch.tensor([2, 0, 1, 2, 1])
    for stage2_keys in ("same", "pair"):
        torch.manual_seed(1)
        alignment = MGAModel(ModelConfig(**TINY, stage2_keys=stage2_keys, ata_layer_scale=0.5)).eval().alignment
        for norm in (module for module in alignment.modules() if isinstance(module, torch.nn.LayerNorm)):  # not all the identity
            norm.weight.data.uniform_(0.5, 1.5, generator=generator), norm.bias.data.normal_(0.0, 0.1, generator=generator)
        with torch.no_grad():
            pairwise = alignment([layer[query_rows] for layer in queries], [layer[gallery_rows] for layer in gallery])
            prepared = alignment.score(alignment.prepare(queries)[query_rows], alignment.prepare(gallery)[gallery_rows])
            alone = torch.cat([alignment([layer[q, None] for layer in queries], [layer[g, None] for layer in gallery]) for q, g in zip(query_rows, gallery_rows)])
        assert torch.allclose(prepared, pairwise, atol=1e-6) and torch.allclose(prepared, alone, atol=1e-6)
        assert pairwise.std() > 1e-3  # pairs that differ score differently
    # Each block's split attention is nn.MultiheadAttention's, whose weights (and names) it uses.
    blocks = (alignment.pair_block, alignment.detail_blocks[0])
    tokens, context = (torch.randn(2, 4, 16, generator=generator) for _ in range(2))
    with torch.no_grad():
        for block, keys_from in zip(blocks, (tokens, context)):
            normed, keys = block.norm_query(tokens), (block.norm_context or block.norm_query)(keys_from)
            expected = tokens + block.gain_attention * block.attention(normed, keys, keys, need_weights=False)[0]
            expected = expected + block.gain_mlp * block.mlp(block.norm_mlp(expected))
            projected = block.project(tokens).chunk(3, -1) if block.norm_context is None else (block.project_query(tokens), *block.project_context(context).chunk(2, -1))
            assert torch.allclose(block.attend(tokens, *projected), expected, atol=1e-6)
    # The weights keep nn.MultiheadAttention's names: models stored before the split load unchanged.
    assert {"alignment.pair_block.attention.in_proj_weight", "alignment.detail_blocks.0.attention.out_proj.weight"} <= tiny_model.state_dict().keys()


def test_artifact_round_trip_and_tamper_detection(tiny_model):
    files = pack_artifact(tiny_model, {"image_size": 64})
    loaded, model_id, config = unpack_artifact(files)
    assert config["image_size"] == 64 and len(model_id) == 16
    batch = images(2)
    with torch.no_grad():
        assert torch.allclose(loaded.embed(batch).global_feature, tiny_model.embed(batch).global_feature, atol=1e-6)
    # A rerank's load: the ATA head alone, no backbone, the same S_token as the whole model's.
    alignment, model_config, alignment_id = unpack_alignment(files)
    assert alignment_id == model_id and model_config == tiny_model.config and not alignment.training
    tokens = tiny_model.embed(batch).tokens
    with torch.no_grad():
        swapped = [layer.flip(0) for layer in tokens]
        assert torch.equal(alignment(tokens, swapped), tiny_model.align_tokens(tokens, swapped))
    tampered = dict(files)
    tampered["config.json"] = files["config.json"].replace(b'"alpha": 0.5', b'"alpha": 0.9')
    with pytest.raises(ArtifactError, match="model_id mismatch"):
        unpack_artifact(tampered, "s3://bucket/model")
    assert b"pickle" not in files["model.safetensors"][:200]
    # Verified without building the model (a search's driver): id and config, or a pickle refused.
    assert verify_artifact(files) == (model_id, config)
    pickled = dict(files, **{"model.safetensors": pickle.dumps({"weights": [1.0]})})
    pickled["artifact.json"] = json.dumps({"model_id": artifact_id(pickled["model.safetensors"], files["config.json"])}).encode()
    with pytest.raises((ArtifactError, ValueError)):
        verify_artifact(pickled, "s3://bucket/model")


def test_an_artifact_from_before_layer_scale_loads_with_plain_blocks():
    # Artifacts written before `ata_layer_scale` existed have no such key and no gains.
    torch.manual_seed(0)
    plain = MGAModel(ModelConfig(**TINY, ata_layer_scale=0.0)).eval()
    files = pack_artifact(plain, {"image_size": 64})
    config = json.loads(files["config.json"])
    del config["model"]["ata_layer_scale"]
    files["config.json"] = json.dumps(config).encode()
    files["artifact.json"] = json.dumps({"model_id": artifact_id(files["model.safetensors"], files["config.json"]), "files": ["model.safetensors", "config.json"]}).encode()
    loaded, _, _ = unpack_artifact(files)
    assert loaded.config.ata_layer_scale == 0.0 and ModelConfig().ata_layer_scale > 0
    batch = images(2)
    tokens = plain.embed(batch).tokens
    with torch.no_grad():
        assert torch.allclose(loaded.align_tokens(tokens, tokens), plain.align_tokens(tokens, tokens), atol=1e-6)


def test_config_errors_name_the_key():
    with pytest.raises(ValidationError, match="num_tokenz"):
        ModelConfig(num_tokenz=4)
    with pytest.raises(ValidationError, match="token_reduce"):
        ModelConfig(token_reduce="median")
    with pytest.raises(ValidationError, match="alpha"):
        ModelConfig(alpha=1.5)
    with pytest.raises(ValueError, match="final stage"):
        MGAModel(ModelConfig(**{**TINY, "layers": (2, 3)}))


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def test_preprocess_converts_modes_and_refuses_broken_files():
    from mga.transforms import ImageDecodeError, preprocess

    rgb = Image.new("RGB", (40, 30), (200, 10, 10))
    for data in (
        _encode(rgb, "JPEG"),
        _encode(rgb.convert("CMYK"), "JPEG"),
        _encode(rgb.convert("L"), "PNG"),
        _encode(rgb.convert("P"), "PNG"),
        _encode(rgb.convert("RGBA"), "PNG"),
        _encode(Image.new("I;16", (40, 30), 60000), "PNG"),
    ):
        out = preprocess(data, [0, 0, 20, 20], 32, rng=np.random.default_rng(0))
        assert out.shape == (3, 32, 32) and out.dtype == np.uint8
    jpeg = _encode(rgb, "JPEG")
    for bad, reason in ((b"", "empty"), (b"hello, not an image", "not an image"), (jpeg[: len(jpeg) // 2], "decode")):
        with pytest.raises(ImageDecodeError, match=reason):
            preprocess(bad, None, 32)
    with pytest.raises(ImageDecodeError, match="too large"):
        preprocess(_encode(Image.new("L", (300, 300)), "PNG"), None, 32, max_pixels=10_000)
