"""The demo corpus: clause extraction on a hand-written play excerpt, splits, prompts."""

from megarlhf.demo import corpus

PLAY = """THE TRAGEDY OF TESTING

ACT I. Scene I. A room.

[Enter Romeo and Friar.]

Rom.
O gentle friar, my heart is full of joy tonight;
And all the stars are bright above the town.

First Citizen.
Speak, speak! What news have you for us, good sir?

[Exit.]
"""


def test_clauses_of_a_play():
    got = corpus.clauses_of_text(PLAY, min_words=3, max_words=16)
    assert got == [
        "O gentle friar, my heart is full of joy tonight;",
        "And all the stars are bright above the town.",
        "What news have you for us, good sir?",
    ]


def test_split_is_disjoint_deterministic_and_order_free():
    clauses = [f"Clause number {i} is here." for i in range(2000)]
    a = corpus.split_corpus(clauses, seed=3)
    b = corpus.split_corpus(list(reversed(clauses)), seed=3)
    parts = (a.pretrain, a.ptx, a.eval_text, a.heldout)
    assert sum(map(len, parts)) == len(clauses)
    assert len(set().union(*map(set, parts))) == len(clauses)
    assert set(a.heldout) == set(b.heldout) and set(a.ptx) == set(b.ptx)
    assert 0.03 < len(a.ptx) / len(clauses) < 0.09  # about 6%


def test_prompt_split_rejoins():
    for c in ("One two three four five six.", "Good morrow to you all, my friends."):
        p, r = corpus.prompt_split(c)
        assert p + r == c and r.startswith(" ") and 2 <= len(p.split()) <= 4


def test_installed_corpus_is_large():
    s = corpus.sentences()
    assert len(s) > 30000 and len(set(s)) == len(s)
