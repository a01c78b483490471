"""Repairs of IFEval responses: every repair passes IFEval's own checkers, changes the response only where its
constraint asks, gives up where the constraint would need new content, and --repair-ties turns a tie into the pair
(repair, sample) and counts it."""

import random

import pytest

from dpo.ifeval import DEFAULT_TYPES, IFEvalPrompt, sampled_constraint
from dpo.ifeval_repair import POSTSCRIPT, REPAIRS, repair
from dpo.judges import IFEvalJudge, build_judge
from dpo.on_policy import OnPolicySettings, Sampler, keeps_end, summarize
from dpo.settings import ConfigError
from harness import tiny_tokenizer

common = pytest.importorskip("if_verifiable.common")
registry = pytest.importorskip("if_verifiable.ifeval.instructions_registry")

LISTED = ("Sure! Here are three ways to stay healthy, in order of importance:\n\n1. Drink water, often.\n"
          "2. Sleep well. It helps a lot!\n3. Exercise daily.\n\nIn summary, small habits add up.")
PLAIN = "The capital of France is Paris, a large city on the Seine. It is known for art, food and history."
LONG = " ".join([PLAIN] * 20)  # 400 words
RESPONSES = [LISTED, PLAIN, LONG, "Paris.", "* one\n* two\n* three\n* four", "Well, it depends; ask again later, please!"]


def ifeval_strict(p: IFEvalPrompt, response: str) -> bool:
    results, _ = common.evaluate_instructions(response, list(p.instruction_id_list), [dict(k) for k in p.kwargs],
                                              p.prompt, registry.INSTRUCTION_DICT)
    return all(r.strict_pass for r in results)


def one(type_id, **kwargs):
    return IFEvalPrompt("Tell me about Paris.", (type_id,), (kwargs,))


@pytest.mark.parametrize("type_id, kwargs, expected", [
    ("change_case:english_lowercase", {}, PLAIN.lower()),
    ("change_case:english_capital", {}, PLAIN.upper()),
    ("punctuation:no_comma", {}, PLAIN.replace(",", "")),
    ("startend:quotation", {}, f'"{PLAIN}"'),
    ("startend:end_checker", {"end_phrase": "Is there anything else I can help with?"},
     f"{PLAIN}\n\nIs there anything else I can help with?"),
    ("detectable_content:postscript", {"postscript_marker": "P.P.S"}, f"{PLAIN}\n\nP.P.S {POSTSCRIPT}"),
    ("detectable_format:title", {}, f"<<The capital of France is Paris a large>>\n\n{PLAIN}"),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2},
     "* The capital of France is Paris, a large city on the Seine.\n* It is known for art, food and history."),
    ("length_constraints:number_words", {"num_words": 15, "relation": "less than"},
     "The capital of France is Paris, a large city on the Seine."),
])
def test_each_repair_is_the_least_change_that_ifeval_passes(type_id, kwargs, expected):
    p = one(type_id, **kwargs)
    assert not ifeval_strict(p, PLAIN)
    assert repair(p, PLAIN) == expected and ifeval_strict(p, expected)


def test_bullets_leave_out_rules_and_keep_a_leading_minus_and_a_repair_is_what_is_trained():
    """A "---" rule or a lone "*" is no bullet of its own (stripped, as trained and as IFEval strips a response, an
    empty last bullet fails); "-5 degrees" keeps its sign."""
    p = one("detectable_format:number_bullet_lists", num_bullets=3)
    fixed = repair(p, "It is cold.\n---\n-5 degrees today.\nWear a coat. Stay in.")
    assert fixed == "* It is cold.\n* -5 degrees today. Wear a coat.\n* Stay in." and ifeval_strict(p, fixed)
    assert repair(p, "It is cold.\n---\nWear a coat.") is None  # two sentences: no third bullet to make
    assert repair(one("punctuation:no_comma"), "  yes, it is.\n") == "yes it is."  # stripped


def test_a_list_of_the_asked_length_keeps_its_items_and_a_title_skips_a_short_opening():
    assert repair(one("detectable_format:number_bullet_lists", num_bullets=3), LISTED) == LISTED.replace(
        "1. ", "* ").replace("2. ", "* ").replace("3. ", "* ")
    assert repair(one("detectable_format:title"), LISTED).startswith("<<Here are three ways to stay healthy in>>")
    # no sentence is cut: a first sentence of 4 words or more under "less than 4" has no repair, as a whole answer
    # (trained with its end) it would teach the policy to stop mid-sentence
    assert repair(one("length_constraints:number_words", num_words=4, relation="less than"), PLAIN) is None
    assert repair(one("length_constraints:number_words", num_words=12, relation="less than"), PLAIN) is None
    assert repair(one("length_constraints:number_words", num_words=13, relation="less than"), PLAIN) == \
        "The capital of France is Paris, a large city on the Seine."
    # the kept sentences as they are written: the list and its paragraph stay
    assert repair(one("length_constraints:number_words", num_words=27, relation="less than"), LISTED) == \
        LISTED[:LISTED.index("\n\nIn summary")]


@pytest.mark.parametrize("p, response", [
    (one("keywords:existence", keywords=["river"]), PLAIN),  # would need new content
    (one("length_constraints:number_words", num_words=500, relation="at least"), PLAIN),
    (one("detectable_format:number_bullet_lists", num_bullets=5), PLAIN),  # two sentences cannot make five bullets
    (one("detectable_format:number_bullet_lists", num_bullets=0), "* one\n* two"),  # the list would become prose
    (one("punctuation:no_comma"), "Paris is big."),  # already followed: nothing to repair
    (one("change_case:english_lowercase"), "   "),
    (IFEvalPrompt("Q", ("change_case:english_lowercase", "keywords:existence"), ({}, {"keywords": ["river"]})), PLAIN),
])
def test_no_repair_where_it_would_need_new_content_or_nothing_is_missed(p, response):
    assert repair(p, response) is None


def test_several_constraints_are_repaired_together():
    p = IFEvalPrompt("Q", ("change_case:english_lowercase", "startend:quotation", "punctuation:no_comma"), ({}, {}, {}))
    fixed = repair(p, PLAIN)
    assert fixed == f'"{PLAIN.lower().replace(",", "")}"' and ifeval_strict(p, fixed)
    # a constraint followed already needs no rewrite, even one that has none: only the missed one is rewritten
    keyword = IFEvalPrompt("Q", ("keywords:existence", "punctuation:no_comma"), ({"keywords": ["Seine"]}, {}))
    assert repair(keyword, PLAIN) == PLAIN.replace(",", "") and ifeval_strict(keyword, PLAIN.replace(",", ""))
    # in the prompt's order the postscript, appended after lower-casing, breaks "all lowercase": the other order
    lower_ps = IFEvalPrompt("Q", ("change_case:english_lowercase", "detectable_content:postscript"),
                            ({}, {"postscript_marker": "P.S."}))
    fixed = repair(lower_ps, PLAIN)
    assert fixed == f"{PLAIN}\n\nP.S. {POSTSCRIPT}".lower() and ifeval_strict(lower_ps, fixed)


ALWAYS = ("change_case:english_lowercase", "change_case:english_capital", "punctuation:no_comma", "startend:quotation",
          "startend:end_checker", "detectable_content:postscript", "detectable_format:title")


def test_every_repair_of_sampled_constraints_passes_ifeval_own_checkers():
    """Brute force: each default type with 12 argument draws of the checkers' own, on five responses; every repair
    given passes IFEval's evaluate_instructions, and every type the module repairs is repaired at least once."""
    repaired_types = set()
    rng = random.Random(0)
    for type_id in DEFAULT_TYPES:
        for _ in range(12):
            description, args = sampled_constraint(type_id, rng.randrange(2 ** 32))
            p = IFEvalPrompt(f"Tell me about Paris. {description}", (type_id,), (args,))
            for response in RESPONSES:
                fixed = repair(p, response)
                if fixed is not None:
                    assert ifeval_strict(p, fixed), (type_id, args, response, fixed)
                    repaired_types.add(type_id)
                elif response in (PLAIN, LISTED) and type_id in ALWAYS:
                    assert ifeval_strict(p, response), (type_id, args, response)  # only a followed one has none
    assert repaired_types == set(REPAIRS)


LENGTHS = dict(max_length=96, max_prompt_length=48, truncation_mode="keep_end", template="recipe")


def test_a_sample_cut_at_the_token_budget_keeps_no_eos():
    """As a response cut by --max-length: the policy is not taught to stop where it did not. A repair of a cut sample
    that keeps its end (commas dropped) is cut as well; one that writes the end (an end phrase appended) is whole."""
    ending = {"end_phrase": "Any other questions?"}
    prompts = [IFEvalPrompt("is the sun red? Do not use any commas.", ("punctuation:no_comma",), ({},)),
               IFEvalPrompt("is the cat red? Do not use any commas.", ("punctuation:no_comma",), ({},)),
               IFEvalPrompt("is the sky red? End with Any other questions?", ("startend:end_checker",), (ending,))]
    samples = [["no, it is yellow", "yes, it is red"], ["no it is black", "yes, red"], ["no it is blue", "yes"]]
    tokenizer = tiny_tokenizer()
    eos = tokenizer.eos_token_id
    judge = IFEvalJudge(prompts)
    sampler = Sampler(OnPolicySettings(online=True, num_samples=2, repair_ties=True), judge, tokenizer, LENGTHS, 0)
    texts = [p.prompt for p in prompts]
    whole, _ = sampler.pairs(texts, samples, rows=[0, 1, 2])
    assert [p.row for p in whole] == [0, 1, 2]
    assert all(p.chosen_ids[-1] == eos and p.rejected_ids[-1] == eos for p in whole)
    pairs, stats = sampler.pairs(texts, samples, rows=[0, 1, 2], cut=[[True, True], [True, False], [True, True]])
    metrics = summarize([stats], seconds=1.0)  # lengths of the pairs' responses, EOS or not: the same either way
    assert metrics["online/cut"] == pytest.approx(5 / 6)
    assert metrics["online/chosen_length"] == pytest.approx(sum(len(p.chosen_ids) - 1 for p in whole) / 3)
    assert metrics["online/rejected_length"] == pytest.approx(sum(len(p.rejected_ids) - 1 for p in whole) / 3)
    assert metrics["online/chosen_length"] != metrics["online/rejected_length"]
    # row 0 ties (both use commas): its repair drops the cut sample's commas and keeps its end: both are cut
    assert (pairs[0].chosen_ids, pairs[0].rejected_ids) == (whole[0].chosen_ids[:-1], whole[0].rejected_ids[:-1])
    # row 1: the chosen "no it is black" was cut, the rejected "yes, red" ended
    assert (pairs[1].chosen_ids, pairs[1].rejected_ids) == (whole[1].chosen_ids[:-1], whole[1].rejected_ids)
    # row 2 ties (neither ends with the phrase): the repair appends it, which ends the answer; the sample was cut
    assert (pairs[2].chosen_ids, pairs[2].rejected_ids) == (whole[2].chosen_ids, whole[2].rejected_ids[:-1])


@pytest.mark.parametrize("end_of_turn", ["<|end|>", None])
def test_a_cut_sample_loses_the_chat_templates_end_of_turn_too(end_of_turn):
    """Phi-3's template ends a turn with <|end|>, which is not the EOS (Gemma's <end_of_turn> alike): a cut sample
    keeps neither; an ended one keeps both. With ChatML-like ends that are the EOS (None here), only the EOS."""
    tokenizer = tiny_tokenizer()
    end = end_of_turn or tokenizer.eos_token
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|user|>", "<|assistant|>", "<|end|>"]})
    tokenizer.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}" + end + "\n"
                               "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
    eos, end_id = tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(end)
    judge = ScoreTable({"the sun is big": 1.0, "no": 0.0})
    settings = OnPolicySettings(online=True, num_samples=2)
    sampler = Sampler(settings, judge, tokenizer, {**LENGTHS, "template": "chat"}, 0)
    assert sampler.end_ids == ([end_id, eos] if end_of_turn else [eos])
    [ended], _ = sampler.pairs(["what is the sun?"], [["the sun is big", "no"]], rows=[0])
    [cut], _ = sampler.pairs(["what is the sun?"], [["the sun is big", "no"]], rows=[0], cut=[[True, False]])
    assert ended.chosen_ids[-len(sampler.end_ids):] == sampler.end_ids
    assert cut.chosen_ids == ended.chosen_ids[:-len(sampler.end_ids)] and end_id not in cut.chosen_ids
    assert tokenizer.decode(cut.chosen_ids).endswith("big") and cut.rejected_ids == ended.rejected_ids


ENDS_ANEW = {"startend:quotation", "startend:end_checker", "detectable_content:postscript",
             "length_constraints:number_words"}


def test_a_repair_keeps_a_samples_end_unless_it_writes_one():
    """Each repairable type, on a sample cut mid-sentence: the case, comma, title and bullet rewrites keep its end;
    a closing quotation mark, an end phrase, a postscript and fewer sentences end it anew. Where a rewrite leaves the
    end as it was (a quoted last word, every sentence under the word limit), the end is kept."""
    rng = random.Random(1)
    cut = ("Paris is the capital of France, on the Seine.\n1. It has the Louvre, a museum.\n2. It has cafes, many "
           "of them.\n3. It has parks. It is large, old and busy, with six bridges and ten")
    for type_id in REPAIRS:
        description, args = sampled_constraint(type_id, rng.randrange(2 ** 32))
        if type_id == "length_constraints:number_words":
            args = {"num_words": 10, "relation": "less than"}  # the first sentence (9 words)
        p = IFEvalPrompt(f"Tell me about Paris. {description}", (type_id,), (args,))
        fixed = repair(p, cut)
        assert fixed is not None and keeps_end(cut, fixed) == (type_id not in ENDS_ANEW), (type_id, fixed)
    quotation = IFEvalPrompt('Say it. Wrap your entire response with double quotation marks.', ("startend:quotation",),
                             ({},))
    quoted_end = 'He said hello and then "bye"'
    assert repair(quotation, quoted_end) == '"He said hello and then "bye"' and keeps_end(quoted_end, '"' + quoted_end)
    listed = "1. one two three\n2. four five six\n3. seven eigh"  # its markers' digits make it 12 words, not 9
    limit = IFEvalPrompt("Count. Answer with less than 10 words.", ("length_constraints:number_words",),
                         ({"num_words": 10, "relation": "less than"},))
    # the list stays a list (IFEval counts its numbers as words): its last item goes, and the answer ends anew
    assert repair(limit, listed) == "1. one two three\n2. four five six" and not keeps_end(listed, repair(limit, listed))
    assert not keeps_end("", "anything") and keeps_end("Straße ist lang", "STRASSE IST LANG")
    # a short last list line: its marker, which the bullet rewrite changes, is not taken for the end
    assert keeps_end("Tips:\n1. Eat well.\n2. Sleep.\n3. Ru", "Tips:\n* Eat well.\n* Sleep.\n* Ru")
    # a "---" rule, which the bullet rewrite leaves out, is not part of the sample's content either
    bullet_prompt = IFEvalPrompt("Tips? Your answer must contain exactly 3 bullet points.",
                                 ("detectable_format:number_bullet_lists",), ({"num_bullets": 3},))
    ruled = "Here are some tips.\n\n---\n\nDrink water every day. Sleep eight hours. Walk for thirty minutes and then"
    assert "---" not in repair(bullet_prompt, ruled) and keeps_end(ruled, repair(bullet_prompt, ruled))
    assert keeps_end(ruled, ruled.lower())  # a rewrite that keeps the rule keeps the end too
    assert not keeps_end("Text.\n---", '"Text.\n---"')  # a closing quotation mark after a rule is a new end
    # what a postscript or an end phrase appends can repeat the sample's last words: still a new end
    assert not keeps_end("Here it is. I hope this helps.", "Here it is. I hope this helps.\n\nP.P.S I hope this helps.")
    assert not keeps_end("It is hot. Questions.", "It is hot. Questions.\n\nAny other questions.")


def test_repair_ties_turns_a_tie_into_the_pair_repair_sample():
    prompts = [IFEvalPrompt("is the sun red? Do not use any commas.", ("punctuation:no_comma",), ({},)),
               IFEvalPrompt("is the moon red? Use at least 300 words.", ("length_constraints:number_words",),
                            ({"num_words": 300, "relation": "at least"},)),
               IFEvalPrompt("is the cat red? Do not use any commas.", ("punctuation:no_comma",), ({},))]
    judge = IFEvalJudge(prompts)
    texts = [p.prompt for p in prompts]
    samples = [["no, it is yellow", "yes, it is red"], ["no", "yes"], ["no it is black", "yes, red"]]
    off = Sampler(OnPolicySettings(online=True, num_samples=2), judge, tiny_tokenizer(), LENGTHS, 0)
    pairs, stats = off.pairs(texts, samples, rows=[0, 1, 2])
    assert [p.row for p in pairs] == [2] and (stats["ties"], stats["repaired"]) == (2, 0)
    on = Sampler(OnPolicySettings(online=True, num_samples=2, repair_ties=True), judge, tiny_tokenizer(), LENGTHS, 0)
    assert on.repaired(texts[0], samples[0], [0.0, 0.0]) == {"chosen": "no it is yellow", "rejected": "no, it is yellow",
                                                      "index": samples[0].index("no, it is yellow")}
    assert on.repaired(texts[1], samples[1], [0.0, 0.0]) is None  # "at least 300 words" cannot be repaired: still a tie
    pairs, stats = on.pairs(texts, samples, rows=[0, 1, 2])
    assert [p.row for p in pairs] == [0, 2] and (stats["ties"], stats["repaired"], stats["pairs"]) == (2, 1, 2)
    tokenizer = tiny_tokenizer()
    assert pairs[0].chosen_ids[:len(tokenizer(" no it is yellow", add_special_tokens=False)["input_ids"])] == \
        tokenizer(" no it is yellow", add_special_tokens=False)["input_ids"]
    metrics = summarize([stats], seconds=1.0)
    assert metrics["online/repaired"] == pytest.approx(1 / 3) and metrics["online/ties"] == pytest.approx(2 / 3)
    # a repair lost when tokenized (the same tokens as its sample) is unusable, not counted as trained on
    on.repaired = lambda prompt, answers, scores: {"chosen": answers[0] + " ", "rejected": answers[0], "index": 0}
    pairs, stats = on.pairs(texts, samples, rows=[0, 1, 2])
    assert [p.row for p in pairs] == [2] and (stats["repaired"], stats["unusable"], stats["pairs"]) == (0, 2, 1)


def test_repair_ties_needs_a_judge_that_repairs():
    with pytest.raises(ConfigError, match="--repair-ties needs a judge that can repair"):
        Sampler(OnPolicySettings(online=True, repair_ties=True), build_judge("demo"), tiny_tokenizer(), LENGTHS, 0)


class ScoreTable:
    """A judge that gives each answer the score listed for it."""

    name = "table"
    can_repair = False

    def __init__(self, scores: dict[str, float]):
        self.scores = scores

    def score_batch(self, prompts, responses):
        return [[self.scores[a] for a in answers] for answers in responses]


def by_definition(choice: str, answers: list[str], best: list[int], worst: list[int]) -> tuple[int, int]:
    """The pair --pair-choice names, by brute force over every (best, worst) pair in sampling order."""
    candidates = [(b, w) for b in best for w in worst]
    if choice == "first":
        return candidates[0]
    if choice == "longest":
        longest, shortest = max(len(answers[b]) for b in best), min(len(answers[w]) for w in worst)
        return next((b, w) for b, w in candidates if len(answers[b]) == longest and len(answers[w]) == shortest)
    gap = min(abs(len(answers[b]) - len(answers[w])) for b, w in candidates)
    return next((b, w) for b, w in candidates if abs(len(answers[b]) - len(answers[w])) == gap)


@pytest.mark.parametrize("choice", ["first", "longest", "matched"])
def test_pair_choice_takes_the_pair_its_definition_names(choice):
    """Brute force over 200 draws of 4 answers (lengths 1-6, scores 0 / 0.5 / 1): the chosen and rejected are those
    the definition of --pair-choice names, ties broken by sampling order."""
    rng = random.Random(0)
    settings = OnPolicySettings(online=True, num_samples=4, pair_choice=choice)
    prompts, samples, expected, scores = [], [], [], {}
    for row in range(200):
        answers = [f"r{row}a{i}" + "x" * rng.randint(1, 6) for i in range(4)]
        scores.update({a: rng.choice([0.0, 0.5, 1.0]) for a in answers})
        top, bottom = max(scores[a] for a in answers), min(scores[a] for a in answers)
        if top == bottom:
            continue
        best = [i for i, a in enumerate(answers) if scores[a] == top]
        worst = [i for i, a in enumerate(answers) if scores[a] == bottom]
        b, w = by_definition(choice, answers, best, worst)
        prompts.append(f"question {row}")
        samples.append(answers)
        expected.append((answers[b], answers[w]))
    sampler = Sampler(settings, ScoreTable(scores), tiny_tokenizer(), LENGTHS, 0)
    pairs, stats = sampler.pairs(prompts, samples, rows=list(range(len(prompts))))
    tokenizer = tiny_tokenizer()
    assert stats["pairs"] == len(expected) > 100
    for pair, (chosen, rejected) in zip(pairs, expected):
        assert tokenizer.decode(pair.chosen_ids, skip_special_tokens=True).strip() == chosen
        assert tokenizer.decode(pair.rejected_ids, skip_special_tokens=True).strip() == rejected
    if choice != "first":  # and it differs from sampling order on some draws
        plain = Sampler(OnPolicySettings(online=True, num_samples=4), ScoreTable(scores), tokenizer, LENGTHS, 0)
        assert [p.chosen_ids for p in plain.pairs(prompts, samples, rows=list(range(len(prompts))))[0]] != \
            [p.chosen_ids for p in pairs]


def test_matched_pairs_differ_less_in_length_than_the_other_choices():
    """Over the same draws, the matched pairs' mean length gap is the smallest of the three choices, and longest's
    chosen-minus-rejected length is the largest."""
    rng = random.Random(1)
    samples = [[f"r{row}a{i}" + "x" * rng.randint(1, 30) for i in range(4)] for row in range(100)]
    scores = {a: rng.choice([0.0, 1.0]) for answers in samples for a in answers}
    prompts = [f"question {row}" for row in range(100)]
    gaps, signed = {}, {}
    for choice in ("first", "longest", "matched"):
        sampler = Sampler(OnPolicySettings(online=True, num_samples=4, pair_choice=choice), ScoreTable(scores),
                          tiny_tokenizer(), LENGTHS, 0)
        pairs, _ = sampler.pairs(prompts, samples, rows=list(range(100)))
        differences = [len(p.chosen_ids) - len(p.rejected_ids) for p in pairs]
        gaps[choice] = sum(abs(d) for d in differences) / len(pairs)
        signed[choice] = sum(differences) / len(pairs)
    assert gaps["matched"] < gaps["first"] and gaps["matched"] < gaps["longest"]
    assert signed["longest"] > signed["first"] and signed["longest"] > signed["matched"]


def test_pair_choice_longest_repairs_the_longest_tied_answer():
    prompt = IFEvalPrompt("is the sun red? Do not use any commas.", ("punctuation:no_comma",), ({},))
    samples = ["no, it is yellow", "well, no, it is yellow, and hot"]
    settings = OnPolicySettings(online=True, num_samples=2, repair_ties=True, pair_choice="longest")
    pairs, stats = Sampler(settings, IFEvalJudge([prompt]), tiny_tokenizer(), LENGTHS, 0).pairs(
        [prompt.prompt], [samples], rows=[0])
    decoded = tiny_tokenizer().decode(pairs[0].chosen_ids, skip_special_tokens=True).strip()
    assert stats["repaired"] == 1 and decoded == "well no it is yellow and hot"


def test_missing_eos_penalty_ranks_a_cut_sample_below_its_score():
    """--missing-eos-penalty P: the pair is chosen by the judge's score minus P for a sample cut at the token budget.
    Brute force over 200 draws of 4 answers (scores 0 / 0.5 / 1, cut or not) against that definition; at P = 0.25
    the judge's score comes first and ending breaks its ties, at P = 1 a cut answer that passes ties one that ended
    and failed. online/score stays the judge's mean."""
    rng = random.Random(2)
    prompts, samples, cut, scores = [], [], [], {}
    for row in range(200):
        answers = [f"r{row}a{i}" + "x" * rng.randint(1, 6) for i in range(4)]
        scores.update({a: rng.choice([0.0, 0.5, 1.0]) for a in answers})
        prompts.append(f"question {row}")
        samples.append(answers)
        cut.append([rng.random() < 0.5 for _ in answers])
    tokenizer = tiny_tokenizer()
    judged_mean = sum(scores.values()) / len(scores)
    chosen = {}
    for penalty in (0.0, 0.25, 1.0):
        expected = []
        for answers, row_cut in zip(samples, cut):
            ranked = [scores[a] - penalty * c for a, c in zip(answers, row_cut)]
            if max(ranked) != min(ranked):
                expected.append((answers[ranked.index(max(ranked))], answers[ranked.index(min(ranked))]))
        settings = OnPolicySettings(online=True, num_samples=4, missing_eos_penalty=penalty)
        pairs, stats = Sampler(settings, ScoreTable(scores), tokenizer, LENGTHS, 0).pairs(
            prompts, samples, rows=list(range(200)), cut=cut)
        assert [(tokenizer.decode(p.chosen_ids, skip_special_tokens=True).strip(),
                 tokenizer.decode(p.rejected_ids, skip_special_tokens=True).strip()) for p in pairs] == expected
        assert stats["score_sum"] / stats["samples"] == pytest.approx(judged_mean)
        if penalty == 0.25:  # the judge first: no pair puts a lower-scored answer first
            assert all(scores[c] >= scores[r] for c, r in expected)
            assert sum(scores[c] == scores[r] for c, r in expected) > 5  # and ending decides some pairs
        chosen[penalty] = expected
    assert chosen[0.0] != chosen[0.25] != chosen[1.0]


def test_a_penalized_score_that_equals_another_ties_with_it_exactly():
    """Three constraints score in sixths: a cut 5/6 less P = 0.5 is 1/3 (0.33333333333333326 in floats), the same as
    an ended 1/3. A tie, skipped, not a pair decided by rounding."""
    scores = {"cut five of six": 5 / 6, "ended two of six": 1 / 3}
    assert 5 / 6 - 0.5 != 1 / 3  # what the rounding removes
    settings = OnPolicySettings(online=True, num_samples=2, missing_eos_penalty=0.5)
    pairs, stats = Sampler(settings, ScoreTable(scores), tiny_tokenizer(), LENGTHS, 0).pairs(
        ["q"], [list(scores)], rows=[0], cut=[[True, False]])
    assert pairs == [] and stats["ties"] == 1


def test_missing_eos_penalty_repairs_a_tie_of_cut_samples_by_the_judge():
    """Samples that tie after the penalty (both cut) are repaired as without it: a repair must score above its own
    sample by the judge, not above the penalized tie (a rewrite scoring as its sample teaches nothing)."""

    class Rewriter(ScoreTable):
        can_repair = True

        def repair(self, prompt, answer):
            return answer + " indeed"

    scores = {"no": 0.5, "yes": 0.5, "no indeed": 0.5, "yes indeed": 0.5, "maybe": 0.0, "maybe indeed": 1.0}
    settings = OnPolicySettings(online=True, num_samples=2, repair_ties=True, missing_eos_penalty=1.0)
    sampler = Sampler(settings, Rewriter(scores), tiny_tokenizer(), LENGTHS, 0)
    pairs, stats = sampler.pairs(["q0", "q1"], [["no", "yes"], ["maybe", "maybe"]], rows=[0, 1],
                                 cut=[[True, True], [True, True]])
    assert (stats["ties"], stats["repaired"], [p.row for p in pairs]) == (2, 1, [1])
    assert tiny_tokenizer().decode(pairs[0].chosen_ids, skip_special_tokens=True).strip() == "maybe indeed"
