"""coalesce: which bodies may be packed, pack/split shapes (validated with the openai SDK), exact usage split.
(Grouping requests as they arrive is packing.Packs, tested end to end with --coalesce.)"""

from __future__ import annotations

from typing import Any

import pytest
from openai.types import CreateEmbeddingResponse

from hfbatch.coalesce import apportion, coalesce_key, input_weight, pack, split

MODEL = "test-org/tiny-embed"


def body(inp: Any, model: str = MODEL, **params: Any) -> dict[str, Any]:
    return {"model": model, "input": inp, **params}


def answer_for(packed: dict[str, Any], prompt_tokens: int, *, shuffle: bool = False) -> dict[str, Any]:
    """What an OpenAI-compatible server answers for a packed body."""
    data = [{"object": "embedding", "index": i, "embedding": [float(i), 0.5]} for i in range(len(packed["input"]))]
    if shuffle:
        data.reverse()
    return {"object": "list", "data": data, "model": packed["model"],
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}}


def group_all(bodies: list[dict[str, Any]], size: int) -> list[list[dict[str, Any]]]:
    """Bodies with equal coalesce_key, `size` at most per group, in arrival order; full groups first."""
    open_groups: dict[Any, list[dict[str, Any]]] = {}
    batches: list[list[dict[str, Any]]] = []
    for b in bodies:
        key = coalesce_key(b)
        assert key is not None
        group = open_groups.setdefault(key, [])
        group.append(b)
        if len(group) == size:
            batches.append(open_groups.pop(key))
    return batches + list(open_groups.values())


# ------------------------------------------------------------------ coalesce_key


def test_key_accepts_single_inputs_only() -> None:
    assert coalesce_key(body("hello")) is not None
    assert coalesce_key(body([1, 2, 3])) is not None  # one token array
    for bad in (["a", "b"], ["a"], [[1, 2]], [[1], [2]], "", [], None, 3, [1, "a"], [True, 2], {"x": 1}):
        assert coalesce_key(body(bad)) is None, bad
    assert coalesce_key({"input": "x"}) is None  # no model
    assert coalesce_key({"model": 3, "input": "x"}) is None


def test_key_groups_by_model_kind_and_parameters() -> None:
    base = coalesce_key(body("a", dimensions=256, encoding_format="float"))
    assert base is not None and base[0] == MODEL
    assert coalesce_key({"encoding_format": "float", "input": "other", "dimensions": 256, "model": MODEL}) == base
    assert coalesce_key(body("a", dimensions=512, encoding_format="float")) != base
    assert coalesce_key(body("a", dimensions=256, encoding_format="base64")) != base
    assert coalesce_key(body("a", dimensions=256)) != base
    assert coalesce_key(body("a", model="other", dimensions=256, encoding_format="float")) != base
    assert coalesce_key(body("a")) != coalesce_key(body([1, 2]))  # texts never packed with token arrays


# ------------------------------------------------------------------ packing


def test_100_single_inputs_by_16_make_7_requests() -> None:
    bodies = [body(f"text {i}") for i in range(100)]
    batches = group_all(bodies, 16)
    assert len(batches) == 7
    assert [len(b) for b in batches] == [16] * 6 + [4]
    packed = [pack(b) for b in batches]
    assert [x for p in packed for x in p["input"]] == [f"text {i}" for i in range(100)]


def test_mixed_parameters_are_never_packed_together() -> None:
    bodies = []
    for i in range(40):
        params: dict[str, Any] = {}
        if i % 2:
            params["dimensions"] = 64
        if i % 3 == 0:
            params["user"] = "u1"
        bodies.append(body(f"t{i}" if i % 5 else [i, i + 1], model=MODEL if i % 7 else "other", **params))
    batches = group_all(bodies, 16)
    assert sum(len(b) for b in batches) == 40
    for batch in batches:
        assert len({coalesce_key(b) for b in batch}) == 1
        packed = pack(batch)
        assert {k: v for k, v in packed.items() if k != "input"} == {k: v for k, v in batch[0].items() if k != "input"}
    with pytest.raises(ValueError):
        pack([body("a"), body("b", dimensions=8)])
    with pytest.raises(ValueError):
        pack([body("a"), body("b", model="other")])
    with pytest.raises(ValueError):
        pack([body("a"), body([1, 2])])
    with pytest.raises(ValueError):
        pack([])
    with pytest.raises(ValueError):
        pack([body(["a", "b"])])


def test_pack_keeps_parameters_and_token_arrays() -> None:
    packed = pack([body([1, 2], dimensions=8), body([3], dimensions=8)])
    assert packed == {"model": MODEL, "input": [[1, 2], [3]], "dimensions": 8}


# ------------------------------------------------------------------ split


def test_split_gives_valid_embedding_responses_with_exact_usage() -> None:
    bodies = [body("a" * n) for n in (1, 2, 3, 10, 7)]
    packed = pack(bodies)
    ans = answer_for(packed, prompt_tokens=101, shuffle=True)
    weights = [input_weight(b) for b in bodies]
    parts = split(ans, len(bodies), weights=weights)
    assert len(parts) == 5
    for i, part in enumerate(parts):
        r = CreateEmbeddingResponse.model_validate(part)
        assert r.model == MODEL and r.object == "list"
        assert len(r.data) == 1 and r.data[0].index == 0 and r.data[0].embedding == [float(i), 0.5]
        assert r.usage.total_tokens == r.usage.prompt_tokens
    assert sum(p["usage"]["prompt_tokens"] for p in parts) == 101
    assert sum(p["usage"]["total_tokens"] for p in parts) == 101
    assert [p["usage"]["prompt_tokens"] for p in parts] == [4, 9, 13, 44, 31]  # 101 x (1,2,3,10,7)/23
    assert ans["data"][0]["index"] == 4  # the answer itself is not modified


def test_split_evenly_and_other_usage_fields() -> None:
    ans = {"object": "list", "model": MODEL, "id": "emb-1",
           "data": [{"object": "embedding", "index": i, "embedding": [0.0]} for i in range(3)],
           "usage": {"prompt_tokens": 10, "total_tokens": 13, "prompt_tokens_details": {"cached_tokens": 2},
                     "note": "x"}}
    parts = split(ans, 3)
    assert [p["usage"]["prompt_tokens"] for p in parts] == [4, 3, 3]
    assert [p["usage"]["total_tokens"] for p in parts] == [5, 4, 4]
    assert [p["usage"]["prompt_tokens_details"]["cached_tokens"] for p in parts] == [1, 1, 0]
    assert all(p["usage"]["note"] == "x" and p["id"] == "emb-1" for p in parts)
    for p in parts:
        CreateEmbeddingResponse.model_validate(p)
    zero = split({**ans, "usage": {"prompt_tokens": 0, "total_tokens": 0}}, 3, weights=[0, 0, 0])
    assert [p["usage"] for p in zero] == [{"prompt_tokens": 0, "total_tokens": 0}] * 3
    assert all("usage" not in p for p in split({k: v for k, v in ans.items() if k != "usage"}, 3))


def test_split_rejects_answers_that_do_not_match() -> None:
    ok = answer_for(pack([body("a"), body("b")]), 4)
    split(ok, 2)
    bad_answers: list[Any] = [
        {**ok, "data": ok["data"][:1]},
        {**ok, "data": ok["data"] + [{"object": "embedding", "index": 2, "embedding": []}]},
        {**ok, "data": [ok["data"][0], ok["data"][0]]},
        {**ok, "data": [ok["data"][0], {**ok["data"][1], "index": 5}]},
        {**ok, "data": [ok["data"][0], {**ok["data"][1], "index": "1"}]},
        {**ok, "data": [ok["data"][0], [0.1]]},
        {k: v for k, v in ok.items() if k != "data"},
        [],
    ]
    for bad in bad_answers:
        with pytest.raises(ValueError):
            split(bad, 2)
    with pytest.raises(ValueError):
        split(ok, 2, weights=[1])
    with pytest.raises(ValueError):
        split(ok, 2, weights=[1, -1])


@pytest.mark.parametrize("total", [0, 1, 7, 100, 12345])
def test_apportion_sums_exactly(total: int) -> None:
    for weights in ([1], [1, 1, 1], [5, 0, 3], [0, 0], [1000, 1, 1, 1], list(range(17))):
        shares = apportion(total, weights)
        assert sum(shares) == total and all(s >= 0 for s in shares)
        if sum(weights):
            for s, w in zip(shares, weights, strict=True):
                assert abs(s - total * w / sum(weights)) < 1
