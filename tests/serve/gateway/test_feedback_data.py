"""The gateway's side of the learning data: corrections on POST /v1/feedback, x-conversation-id
scoped to the key, and POST /admin/forget, on the real app with vLLM faked by respx.

    pytest tests/serve/gateway/test_feedback_data.py
"""

from __future__ import annotations

from sqlmodel import Session, select

from feedback.curate import CurationConfig
from feedback.models import Conversation, Deletion, Feedback, Turn
from feedback.snapshot import create_snapshot
from serve.settings import hash_key
from tests.serve.gateway.fakes import MESSAGES, turns, vllm_answer

KEYS = {"serve": {"api_keys": [hash_key("alice"), hash_key("bob")], "admin_keys": [hash_key("root")]}}


def bearer(key: str) -> dict:
    return {"authorization": f"Bearer {key}"}


async def chat(gw, key: str | None = None, conversation: str | None = None) -> str:
    headers = {**(bearer(key) if key else {}), **({"x-conversation-id": conversation} if conversation else {})}
    r = await gw.client.post("/v1/chat/completions", json={"messages": MESSAGES}, headers=headers)
    assert r.status_code == 200, r.text
    return r.json()["id"]


async def test_a_correction_is_stored_with_its_rating(gw, upstream):
    upstream.post("/v1/chat/completions").respond(200, json=vllm_answer("Lyon."))
    completion_id = await chat(gw)
    r = await gw.client.post("/v1/feedback", json={"completion_id": completion_id, "rating": "down", "correction": "Paris."})
    assert r.status_code == 201, r.text
    assert r.json()["correction"] == "Paris." and r.json()["rating"] == "down"
    with Session(gw.db) as s:
        assert s.get(Turn, completion_id).correction == "Paris."
        assert [f.correction for f in s.exec(select(Feedback))] == ["Paris."]
    r = await gw.client.post("/v1/feedback", json={"completion_id": completion_id, "rating": "down", "correction": "  "})
    assert r.status_code == 422 and "correction" in r.text


async def test_with_scrub_at_write_a_correction_is_stored_without_pii(make_gw, upstream):
    gw = await make_gw(store={"scrub_at_write": True})
    upstream.post("/v1/chat/completions").respond(200, json=vllm_answer())
    completion_id = await chat(gw)
    r = await gw.client.post("/v1/feedback", json={"completion_id": completion_id, "rating": "down",
                                                   "correction": "Write to jane.doe@example.com", "comment": "call +44 20 7946 0958"})
    assert r.status_code == 201
    assert r.json()["correction"] == "Write to [EMAIL]" and r.json()["comment"] == "call [PHONE]"


async def test_a_foreign_conversation_id_starts_a_new_conversation(make_gw, upstream):
    gw = await make_gw(**KEYS)
    upstream.post("/v1/chat/completions").respond(200, json=vllm_answer())
    a1 = await chat(gw, "alice", "support-1")
    b1 = await chat(gw, "bob", "support-1")  # bob names alice's conversation
    a2 = await chat(gw, "alice", "support-1")
    by_id = {t.id: t for t in turns(gw.writer)}
    assert by_id[a1].conversation_id == by_id[a2].conversation_id == "support-1"
    assert by_id[b1].conversation_id != "support-1"
    with Session(gw.db) as s:
        assert s.get(Conversation, by_id[b1].conversation_id).key_hash == hash_key("bob")


async def test_admin_forget_deletes_a_conversation_and_names_the_adapters_trained_on_it(make_gw, upstream, tmp_path):
    gw = await make_gw(registry=True, **KEYS)
    upstream.post("/v1/chat/completions").respond(200, json=vllm_answer())
    forgotten = await chat(gw, "alice", "support-1")
    kept = await chat(gw, "bob", "support-9")
    r = await gw.client.post("/v1/feedback", json={"completion_id": forgotten, "rating": "up"}, headers=bearer("alice"))
    assert r.status_code == 201
    snap = create_snapshot(gw.db, root=gw.settings.learn_dirs.snapshots, config=CurationConfig(heldout_fraction=0.0))
    name = gw.registry.new_version_name("chat")
    (tmp_path / name).mkdir()
    gw.registry.register(name, kind="chat", path=tmp_path / name, snapshot_hash=snap.manifest["hash"])
    body = {"conversation": "support-1"}
    assert (await gw.client.post("/admin/forget", json=body)).status_code == 401
    assert (await gw.client.post("/admin/forget", json=body, headers=bearer("alice"))).status_code == 403
    bad = await gw.client.post("/admin/forget", json={"conversation": "x", "key": "f" * 64}, headers=bearer("root"))
    assert bad.status_code == 422
    r = await gw.client.post("/admin/forget", json=body, headers=bearer("root"))
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["deletion"]["turns"] == 1 and out["deletion"]["requested_by"] == hash_key("root")
    assert out["adapters"] == [name] and out["snapshots"] == [{"version": snap.version, "hash": snap.manifest["hash"]}]
    with Session(gw.db) as s:
        assert s.get(Turn, forgotten) is None and s.get(Turn, kept) is not None
        assert len(s.exec(select(Deletion)).all()) == 1


def test_the_readmes_sdk_feedback_call_works(tmp_path, fake_engine_url):
    """What the README shows an OpenAI SDK user: chat, then POST /v1/feedback through the
    client's own `post` (the SDK's way to a route it has no method for)."""
    import httpx

    from tests.fixtures.gateway import start_gateway

    gw = start_gateway(tmp_path, fake_engine_url, registry=False)
    try:
        client = gw.client()
        r = client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "Capital of France?"}])
        fb = client.post("/feedback", cast_to=httpx.Response,
                         body={"completion_id": r.id, "rating": "down", "correction": "Paris."})
        assert fb.status_code == 201 and fb.json()["correction"] == "Paris."
    finally:
        gw.stop()
