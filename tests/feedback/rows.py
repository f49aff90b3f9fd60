"""Hand-made turn rows, as curation reads them from the store (`feedback.queries.iter_log`).

    rows = three_turns("c1", ratings=(None, "up", None)) + [turn("c2", 0, [msg(U, "Hi")], "Hello", "up")]
"""

from __future__ import annotations

U, A, S = "user", "assistant", "system"


def msg(role: str, content: str) -> dict:
    return {"role": role, "content": content}


def turn(cid: str, seq: int, messages: list[dict], answer: str, rating: str | None = None, status: str = "ok", **kw) -> dict:
    return {"id": f"{cid}-{seq}", "conversation_id": cid, "seq": seq, "request_messages": messages, "answer": answer,
            "rating": rating, "status": status, "created_at": f"2025-01-01T00:00:{seq:02d}", **kw}


def three_turns(cid: str = "c1", ratings=(None, "up", None)) -> list[dict]:
    """A conversation of three turns; each request holds the full history the client sent."""
    history = [msg(S, "Be brief."), msg(U, f"Hi, who are you? I am {cid}.")]
    rows = []
    for seq, (answer, rating) in enumerate(zip(["I am a bot.", "Paris is the capital.", "About 2 million."], ratings)):
        rows.append(turn(cid, seq, list(history), answer, rating))
        history += [msg(A, answer), msg(U, ["What is the capital of France?", "How many people live there?", "x"][seq])]
    return rows
