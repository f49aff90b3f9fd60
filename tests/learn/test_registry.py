"""The adapter registry on real databases: SQLite always, PostgreSQL with `-m postgres`.

    pytest tests/learn/test_registry.py                 # SQLite and, when a server can start, Postgres
    pytest tests/learn/test_registry.py -m "not postgres"

States, lineage, the prod pointer and rollback, immutability, names never reused, a vanished
adapter folder, concurrent promotions, and the 0002 migration matching the models.
"""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import pytest
from sqlmodel import Session

from feedback.db import make_db
from learn.registry import AdapterMissing, AdapterVersion, Registry, RegistryError, VersionNotFound
from tests.learn.fake_gateway import FakeGateway


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db(request, tmp_path):
    url = f"sqlite:///{tmp_path}/registry.db" if request.param == "sqlite" else request.getfixturevalue("pg_fresh_url")
    engine = make_db(url)
    yield engine
    engine.dispose()


@pytest.fixture
def reg(db) -> Registry:
    return Registry(db)


def add(reg: Registry, tmp_path: Path, kind: str = "chat", style: str | None = None, **kw) -> str:
    name = reg.new_version_name(kind, style)
    folder = tmp_path / "adapters" / name
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text("{}")
    reg.register(name, kind=kind, style=style, path=folder, **kw)
    return name


def states(reg: Registry) -> dict[str, str]:
    return {v.name: v.state for v in reg.list()}


def test_names_count_up_per_kind_and_style(reg):
    assert reg.new_version_name("chat") == "chat-v0001"
    assert reg.new_version_name("chat") == "chat-v0002"
    assert reg.new_version_name("restyler", "pirate") == "restyler-pirate-v0001"
    assert reg.new_version_name("restyler", "formal") == "restyler-formal-v0001"


def test_a_name_handed_out_is_never_reused_even_unregistered(reg, tmp_path):
    first = reg.new_version_name("chat")  # training failed: never registered
    second = add(reg, tmp_path)
    assert (first, second) == ("chat-v0001", "chat-v0002")
    assert Registry(reg.db).new_version_name("chat") == "chat-v0003"  # another process sees the same counter


def test_bad_kind_or_style_is_refused(reg):
    with pytest.raises(RegistryError, match="kind"):
        reg.new_version_name("vision")
    with pytest.raises(RegistryError, match="style"):
        reg.new_version_name("restyler")
    with pytest.raises(RegistryError, match="style"):
        reg.new_version_name("restyler", "Pirate Talk")
    with pytest.raises(RegistryError):
        reg.new_version_name("chat", "pirate")


def test_register_keeps_lineage(reg, tmp_path):
    parent = add(reg, tmp_path)
    child = add(reg, tmp_path, parent=parent, snapshot_hash="abc123", train_config={"rank": 16, "lr": 2e-4})
    v = reg.get(child)
    assert v.state == "candidate"
    assert (v.parent, v.snapshot_hash, v.train_config) == (parent, "abc123", {"rank": 16, "lr": 2e-4})
    assert Path(v.path).is_dir() and Path(v.path).is_absolute()
    assert reg.get("chat-v0099") is None


def test_register_refuses_duplicates_unknown_parents_missing_folders(reg, tmp_path):
    name = add(reg, tmp_path)
    with pytest.raises(RegistryError, match="already registered"):
        reg.register(name, kind="chat", path=tmp_path)
    with pytest.raises(VersionNotFound):
        reg.register(reg.new_version_name("chat"), kind="chat", path=tmp_path, parent="chat-v0042")
    with pytest.raises(AdapterMissing):
        reg.register(reg.new_version_name("chat"), kind="chat", path=tmp_path / "nope")
    with pytest.raises(RegistryError, match="does not belong"):
        reg.register("restyler-pirate-v0009", kind="chat", path=tmp_path)


def test_promote_moves_prod_and_retires_the_previous(reg, tmp_path):
    v1, v2 = add(reg, tmp_path), add(reg, tmp_path)
    assert reg.prod() is None
    change = reg.promote(v1, gate={"promote": True}, metrics={"em": 0.5, "f1": 0.7})
    assert (change.previous, change.current) == (None, v1)
    assert reg.prod().name == v1
    assert reg.get(v1).gate == {"promote": True} and reg.get(v1).metrics["f1"] == 0.7
    change = reg.promote(v2)
    assert (change.previous, change.current) == (v1, v2)
    assert "chat-v0001 -> chat-v0002" in change.describe()
    assert states(reg) == {v1: "retired", v2: "promoted"}
    assert [(h.action, h.previous, h.version) for h in reg.history()] == [("promote", None, v1), ("promote", v1, v2)]
    with pytest.raises(RegistryError, match="already in production"):
        reg.promote(v2)


def test_reject_keeps_the_gate_and_blocks_promotion(reg, tmp_path):
    v1 = add(reg, tmp_path)
    gate = {"promote": False, "reasons": ["F1 short"], "champion": {"f1": 0.5}, "candidate": {"f1": 0.4}}
    reg.reject(v1, gate)
    assert reg.get(v1).state == "rejected" and reg.get(v1).gate == gate
    with pytest.raises(RegistryError, match="rejected"):
        reg.promote(v1)
    with pytest.raises(RegistryError, match="only candidates"):
        reg.reject(v1, gate)
    v2 = add(reg, tmp_path)
    reg.reject(v2, error="evaluation failed: engine unreachable")
    assert reg.get(v2).error.startswith("evaluation failed")
    assert reg.prod() is None
    with pytest.raises(VersionNotFound):
        reg.promote("chat-v0077")


def test_rollback_walks_back_to_base(reg, tmp_path):
    v1, v2, v3 = add(reg, tmp_path), add(reg, tmp_path), add(reg, tmp_path)
    reg.promote(v1)
    reg.promote(v2)
    reg.promote(v3)
    change = reg.rollback("chat")
    assert (change.previous, change.current) == (v3, v2)
    assert reg.prod().name == v2
    assert states(reg) == {v1: "retired", v2: "promoted", v3: "retired"}
    assert reg.rollback().current == v1
    assert reg.rollback().current is None  # back to the base model
    assert reg.prod() is None
    assert set(states(reg).values()) == {"retired"}
    with pytest.raises(RegistryError, match="nothing to roll back"):
        reg.rollback()
    reg.promote(v3)  # a retired version can be promoted again
    assert reg.prod().name == v3


def test_rollback_after_rollback_and_repromote(reg, tmp_path):
    v1, v2 = add(reg, tmp_path), add(reg, tmp_path)
    reg.promote(v1)
    reg.promote(v2)
    reg.rollback()
    reg.promote(v2)
    assert reg.rollback().current == v1  # not v2 again: the history is a stack


def test_kinds_and_styles_have_their_own_pointers(reg, tmp_path):
    chat = add(reg, tmp_path)
    pirate = add(reg, tmp_path, kind="restyler", style="pirate")
    reg.promote(chat)
    reg.promote(pirate)
    assert reg.prod("chat").name == chat
    assert reg.prod("restyler", "pirate").name == pirate
    assert reg.prod("restyler", "formal") is None
    reg.rollback("restyler", "pirate")
    assert reg.prod("chat").name == chat and reg.prod("restyler", "pirate") is None
    assert [v.name for v in reg.list(kind="restyler")] == [pirate]


def test_versions_are_immutable(reg, tmp_path):
    name = add(reg, tmp_path, train_config={"rank": 16})
    reg.promote(name, metrics={"f1": 0.9})
    for column, value in (("path", "/elsewhere"), ("train_config", {"rank": 64}), ("parent", "chat-v0000")):
        with Session(reg.db) as s:
            setattr(s.get(AdapterVersion, name), column, value)
            with pytest.raises(RegistryError, match="immutable"):
                s.commit()
    with Session(reg.db) as s:
        s.get(AdapterVersion, name).metrics = {"f1": 1.0}
        with pytest.raises(RegistryError, match="written once"):
            s.commit()
    v = reg.get(name)
    assert v.path.endswith(name) and v.train_config == {"rank": 16} and v.metrics == {"f1": 0.9}


def test_metrics_only_grow(reg, tmp_path):
    train = {"steps": 3, "train_loss": 1.2}
    v1, v2 = add(reg, tmp_path, metrics={"train": train}), add(reg, tmp_path, metrics={"train": train})
    heldout = {"champion": {"f1": 0.4}, "candidate": {"f1": 0.9}}
    reg.promote(v1, metrics={"train": train, "heldout": heldout})  # what the learner cycle passes
    assert reg.get(v1).metrics == {"train": train, "heldout": heldout}
    with pytest.raises(RegistryError, match="only ever added"):
        reg.reject(v2, metrics={"train": {"steps": 99}})
    assert reg.get(v2).state == "candidate" and reg.get(v2).metrics == {"train": train}


def test_vanished_folder_leaves_prod_unchanged(reg, tmp_path):
    v1, v2 = add(reg, tmp_path), add(reg, tmp_path)
    reg.promote(v1)
    shutil.rmtree(reg.get(v2).path)
    with pytest.raises(AdapterMissing, match=f"{v2}.*vanished.*stays on {v1}"):
        reg.promote(v2)
    assert reg.prod().name == v1
    assert states(reg) == {v1: "promoted", v2: "candidate"}


def test_rollback_to_a_vanished_folder_leaves_prod_unchanged(reg, tmp_path):
    v1, v2 = add(reg, tmp_path), add(reg, tmp_path)
    reg.promote(v1)
    reg.promote(v2)
    shutil.rmtree(reg.get(v1).path)
    with pytest.raises(AdapterMissing, match=v1):
        reg.rollback()
    assert reg.prod().name == v2
    assert states(reg) == {v1: "retired", v2: "promoted"}


def test_concurrent_promotions_leave_one_consistent_prod(reg, tmp_path):
    names = [add(reg, tmp_path) for _ in range(6)]
    errors: list[Exception] = []

    def promote(name: str) -> None:
        try:
            reg.promote(name)
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=promote, args=(n,)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    promoted = [n for n, s in states(reg).items() if s == "promoted"]
    assert promoted == [reg.prod().name]
    history = reg.history()
    assert len(history) == len(names)
    # every move started from where the previous one left the pointer
    assert [h.previous for h in history] == [None] + [h.version for h in history[:-1]]


def test_promote_racing_reject_ends_consistent(reg, tmp_path):
    for _ in range(3):
        name = add(reg, tmp_path)
        outcomes: list[str] = []

        def attempt(action) -> None:
            try:
                action(name)
                outcomes.append("ok")
            except RegistryError:
                outcomes.append("refused")

        threads = [threading.Thread(target=attempt, args=(a,)) for a in (reg.promote, reg.reject)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(outcomes) == ["ok", "refused"]
        prod = reg.prod()
        assert (reg.get(name).state == "promoted") == (prod is not None and prod.name == name)


def test_concurrent_name_requests_never_collide(reg):
    got: list[str] = []
    threads = [threading.Thread(target=lambda: got.append(reg.new_version_name("chat"))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got) == [f"chat-v{i:04d}" for i in range(1, 9)]


def test_migration_matches_the_models(db):
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext
    from sqlmodel import SQLModel

    ours = {"adapterversion", "aliaspointer", "aliashistory"}
    with db.connect() as conn:
        diffs = compare_metadata(MigrationContext.configure(conn), SQLModel.metadata)

    def table_of(diff) -> str | None:
        op = diff[0] if isinstance(diff, list) else diff  # modify_* diffs come as lists of tuples
        if op[0] in ("add_table", "remove_table"):
            return op[1].name
        if op[0] in ("add_index", "remove_index", "add_constraint", "remove_constraint"):
            return op[1].table.name
        return op[2]  # add_column, remove_column, modify_*: (kind, schema, table, ...)

    assert [d for d in diffs if table_of(d) in ours] == []


def test_adapters_cli(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from serve.cli import app
    from serve.settings import load_settings

    monkeypatch.setenv("TUNEWHEEL_DATA_DIR", str(tmp_path / "data"))
    reg = Registry(make_db(load_settings().store_url))
    v1 = add(reg, tmp_path, train_config={"rank": 16}, metrics={"heldout": {"candidate": {"em": 0.5, "f1": 0.75}}})
    v2 = add(reg, tmp_path, parent=v1)
    run = CliRunner().invoke

    with FakeGateway(reg):  # `adapters promote` hands the load to a running gateway, then waits for it
        result = run(app, ["adapters", "promote", v1])
        assert result.exit_code == 0, result.output
        assert "chat: prod base -> chat-v0001" in result.output
        assert run(app, ["adapters", "promote", v2]).exit_code == 0
    listing = run(app, ["adapters", "list"]).output
    assert "chat-v0002" in listing and "promoted" in listing and "retired" in listing
    assert "0.750" in listing  # the held-out F1 the learner stored

    result = run(app, ["adapters", "rollback"])
    assert result.exit_code == 0, result.output
    assert "chat: prod chat-v0002 -> chat-v0001" in result.output
    assert reg.prod().name == v1

    result = run(app, ["adapters", "promote", "chat-v0042"])
    assert result.exit_code == 1
    assert "no adapter version named chat-v0042" in result.output
    assert run(app, ["adapters", "rollback", "--kind", "restyler"]).exit_code == 1
    assert reg.prod().name == v1
