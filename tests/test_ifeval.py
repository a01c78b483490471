"""IFEval: the judge's verdicts are IFEval's own (if-verifiable's evaluate_instructions), the loose variants are
IFEval's, prompts with IFEval's fields load from IFEval's own format with one-line errors, the builder keeps
evaluation instructions out of training, and the report's accuracies and intervals are counted right."""

import json
import random
import stat

import pytest

from dpo.data import DataError, instruction_records, load_records
from dpo.evaluate import clustered_proportion, format_ifeval, ifeval_summary, proportion, wilson_interval
from dpo.ifeval import (DEFAULT_TYPES, IFEvalError, IFEvalPrompt, constraint_descriptions, constrained_prompts,
                        ECHO_RUN, echoed_constraint, loose_variants, main, nltk_has, parse_prompt, sampled_constraint,
                        split_instructions, verdicts)
from dpo.judges import IFEvalJudge, IFEvalNoEchoJudge, IFEvalNoEchoNoLoopJudge, JudgeError, build_judge, prompt_records
from dpo.repetition import repeats_itself
from harness import make_model_dir, run_metrics, train_tiny

common = pytest.importorskip("if_verifiable.common")
registry = pytest.importorskip("if_verifiable.ifeval.instructions_registry")

# (type, kwargs, a response that follows it, one that does not): every type but the two that need nltk data
CASES = [
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "Paris is big.\n\nP.S. I love it.",
     "Paris is big."),
    ("detectable_format:title", {}, "<<On Paris>>\nParis is big.", "On Paris\nParis is big."),
    ("length_constraints:number_words", {"num_words": 5, "relation": "less than"}, "Paris is big.",
     "Paris is a very big and old city."),
    ("startend:end_checker", {"end_phrase": "Any other questions?"}, "Paris is big. Any other questions?",
     "Any other questions? Paris is big."),
    ("change_case:english_lowercase", {}, "paris is the capital of france.", "Paris is the capital of France."),
    ("punctuation:no_comma", {}, "Paris is big and old.", "Paris is big, and old."),
    ("startend:quotation", {}, '"Paris is big."', "Paris is big."),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "* Paris\n* Lyon", "* Paris\n* Lyon\n* Nice"),
    ("change_case:english_capital", {}, "PARIS IS THE CAPITAL OF FRANCE.", "PARIS is the capital of France."),
    ("keywords:existence", {"keywords": ["river", "bridge"]}, "A bridge over the river.", "A bridge in Paris."),
    ("keywords:forbidden_words", {"forbidden_words": ["city"]}, "Paris is big.", "Paris is a big city."),
    ("detectable_format:json_format", {}, '{"capital": "Paris"}', "The capital is Paris."),
    ("keywords:frequency", {"keyword": "seine", "frequency": 2, "relation": "at least"},
     "The Seine runs through Paris; the seine is long.", "The Seine runs through Paris."),
    ("keywords:letter_frequency", {"letter": "z", "let_frequency": 2, "let_relation": "less than"},
     "Paris is big.", "Paris has a zoo and a plaza."),
    ("language:response_language", {"language": "fr"},
     "Paris est la capitale de la France et la plus grande ville du pays.",
     "Paris is the capital of France and the largest city of the country."),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "Paris is big.\n***\nIt is old.",
     "Paris is big. It is old."),
    ("length_constraints:nth_paragraph_first_word", {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "it"},
     "Paris is big.\n\nIt is old.", "Paris is big.\n\nParis is old."),
    ("detectable_content:number_placeholders", {"num_placeholders": 2}, "Meet at [address] on [date].",
     "Meet at [address] tomorrow."),
    ("detectable_format:constrained_response", {}, "My answer is yes.", "Yes, it is."),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2}, "*Paris* is *big*.",
     "*Paris* is big."),
    ("detectable_format:multiple_sections", {"section_spliter": "Section", "num_sections": 2},
     "Section 1\nParis is big.\nSection 2\nIt is old.", "Section 1\nParis is big and old."),
    ("combination:two_responses", {}, "Paris.\n******\nThe capital is Paris.", "Paris.\n******\nParis."),
    ("combination:repeat_prompt", {"prompt_to_repeat": "What is the capital of France?"},
     "What is the capital of France? Paris.", "Paris is the capital of France."),
]
NEED_NLTK_DATA = {"length_constraints:number_sentences", "change_case:capital_word_frequency"}


def prompt(type_id, kwargs, text="What is the capital of France?"):
    return IFEvalPrompt(text, (type_id,), (kwargs,))


def ifeval_own(p: IFEvalPrompt, response: str):
    results, _ = common.evaluate_instructions(response, list(p.instruction_id_list), [dict(k) for k in p.kwargs],
                                              p.prompt, registry.INSTRUCTION_DICT)
    return [r.strict_pass for r in results], [r.loose_pass for r in results]


def test_the_cases_cover_every_type_that_runs_without_nltk_data():
    assert {c[0] for c in CASES} == set(registry.INSTRUCTION_DICT) - NEED_NLTK_DATA


@pytest.mark.parametrize("type_id, kwargs, follows, breaks", CASES, ids=[c[0] for c in CASES])
def test_each_type_agrees_with_ifeval_own_checker(type_id, kwargs, follows, breaks):
    p = prompt(type_id, kwargs)
    assert verdicts(p, follows) == ifeval_own(p, follows) and verdicts(p, follows)[0] == [True]
    assert verdicts(p, breaks) == ifeval_own(p, breaks) and verdicts(p, breaks)[0] == [False]


def test_loose_forgives_a_first_line_and_asterisks_as_ifeval_does():
    p = prompt("startend:quotation", {})
    response = 'Sure, here it is:\n"Paris is big."'
    assert verdicts(p, response) == ([False], [True]) == ifeval_own(p, response)
    lowercase = prompt("change_case:english_lowercase", {})
    answer = "**Answer**\nthe capital of france is paris, a large and beautiful city on the river."
    assert verdicts(lowercase, answer) == ([False], [True]) == ifeval_own(lowercase, answer)
    assert loose_variants("a\n*b*\nc") == ["a\n*b*\nc", "a\nb\nc", "*b*\nc", "a\n*b*", "*b*", "b\nc", "a\nb", "b"]
    assert verdicts(p, "   ") == ([False], [False])  # an empty answer follows nothing


def test_multiple_constraints_and_prompt_level_verdicts():
    p = IFEvalPrompt("Q", ("punctuation:no_comma", "change_case:english_lowercase"), ({}, {}))
    judge = IFEvalJudge([p])
    comma = "the capital of france is paris, a large and beautiful city on the river."
    both = "the capital of france is paris and it is a large and beautiful city on the river."
    neither, shouted = "The capital of France is Paris, a large city.", "THE CAPITAL OF FRANCE IS PARIS, A LARGE CITY."
    assert judge.verdicts("Q", comma) == ([False, True], [False, True])
    assert judge.score("Q", comma) == 0.5 and judge.score("Q", both) == 1.0
    loosely = "**Title**\nthe capital of france is paris and it is a large and beautiful city on the river."
    assert judge.verdicts("Q", loosely) == ([True, False], [True, True]) and judge.score("Q", loosely) == 0.75
    assert judge.checks("Q", comma) == {"strict": False, "loose": False}
    assert judge.compare("Q", both, neither) == 1.0
    assert judge.compare("Q", neither, shouted) == 0.5
    assert judge.category("Q") == "punctuation:no_comma,change_case:english_lowercase"
    with pytest.raises(JudgeError, match="no constraints for 'other'"):
        judge.score("other", "x")


def test_ifeval_input_data_rows_load_as_they_are(tmp_path):
    rows = [{"key": 1000, "prompt": "Write a haiku about Paris. Do not use any commas.",
             "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]},
            {"key": 1001, "prompt": "Describe Lyon. Answer with less than 20 words.",
             "instruction_id_list": ["length_constraints:number_words"],
             "kwargs": [{"num_words": 20, "relation": "less than", "num_highlights": None}]}]
    path = tmp_path / "input_data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    records, _ = load_records(str(path), None)
    found, left_out = instruction_records(records)
    assert list(found) == [r["prompt"] for r in rows] and left_out == 0
    judge = build_judge("ifeval", prompts={text: (f"{path}, row {row}", record) for text, (row, record) in found.items()})
    p = judge.prompt(rows[1]["prompt"])
    assert p.kwargs == ({"num_words": 20, "relation": "less than"},) and p.key == 1001  # None arguments dropped
    assert judge.score(rows[0]["prompt"], "Paris in spring") == 1.0


@pytest.mark.parametrize("record, message", [
    ({"prompt": "Q", "instruction_id_list": ["punctuation:no_comma"]}, "no field 'kwargs'"),
    ({"prompt": " ", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}, "'prompt' must be non-empty"),
    ({"prompt": "Q", "instruction_id_list": ["punctuation:no_comas"], "kwargs": [{}]},
     "unknown constraint type 'punctuation:no_comas'"),
    ({"prompt": "Q", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}, {}]},
     "'kwargs' must be a list of 1 objects"),
    ({"prompt": "Q", "instruction_id_list": [], "kwargs": []}, "'instruction_id_list' must be a non-empty list"),
    # kwargs that are not the checker's: caught here, not at the first verdict hours into a run
    ({"prompt": "Q", "instruction_id_list": ["detectable_format:number_bullet_lists"], "kwargs": [{"bullets": 3}]},
     "field 'kwargs' gives detectable_format:number_bullet_lists an argument 'bullets' it does not take "
     r"\(its arguments: num_bullets\)"),
    ({"prompt": "Q", "instruction_id_list": ["startend:end_checker"], "kwargs": [{"end_phrase": None}]},
     "field 'kwargs' gives startend:end_checker no 'end_phrase' .*draws a new one at every verdict"),
    ({"prompt": "Q", "instruction_id_list": ["detectable_format:number_bullet_lists"], "kwargs": [{"num_bullets": "3"}]},
     "field 'kwargs' of detectable_format:number_bullet_lists does not fit its checker \\(TypeError: "),
    # values the checker replaces with a draw of its own at every verdict, and a keyword list given as a string
    ({"prompt": "Q", "instruction_id_list": ["length_constraints:number_words"],
      "kwargs": [{"num_words": -5, "relation": "at least"}]},
     r"gives length_constraints:number_words a 'num_words' it cannot use \(-5\); the checker draws a new one"),
    ({"prompt": "Q", "instruction_id_list": ["keywords:letter_frequency"],
      "kwargs": [{"letter": "ab", "let_frequency": 3, "let_relation": "at least"}]}, "a 'letter' it cannot use"),
    ({"prompt": "Q", "instruction_id_list": ["keywords:existence"], "kwargs": [{"keywords": []}]},
     r"a 'keywords' it cannot use \(\[\]\)"),
    ({"prompt": "Q", "instruction_id_list": ["detectable_format:number_bullet_lists"], "kwargs": [{"num_bullets": -1}]},
     "a 'num_bullets' it cannot use"),
    ({"prompt": "Q", "instruction_id_list": ["length_constraints:nth_paragraph_first_word"],
      "kwargs": [{"num_paragraphs": 2, "nth_paragraph": 3, "first_word": "paris"}]}, "a 'nth_paragraph' it cannot use"),
    ({"prompt": "Q", "instruction_id_list": ["keywords:forbidden_words"], "kwargs": [{"forbidden_words": "horse"}]},
     "a 'forbidden_words' that is not a list of words \\('horse'\\)"),
    # the value named is the one replaced, not one the checker only normalizes ('A' -> 'a', 'The' -> 'the')
    ({"prompt": "Q", "instruction_id_list": ["keywords:letter_frequency"],
      "kwargs": [{"letter": "A", "let_frequency": -1, "let_relation": "less than"}]}, "a 'let_frequency' it cannot use"),
    ({"prompt": "Q", "instruction_id_list": ["length_constraints:nth_paragraph_first_word"],
      "kwargs": [{"first_word": "The", "num_paragraphs": 0, "nth_paragraph": 0}]}, "a 'nth_paragraph' it cannot use"),
    # a KeyError is the checker's, not missing nltk data
    ({"prompt": "Q", "instruction_id_list": ["language:response_language"], "kwargs": [{"language": "zh"}]},
     "field 'kwargs' of language:response_language does not fit its checker \\(KeyError: 'zh'\\)"),
])
def test_bad_prompts_are_one_line_errors_naming_file_row_and_field(record, message):
    with pytest.raises(IFEvalError, match=message) as error:
        parse_prompt(record, "data.jsonl, row 7")
    assert str(error.value).startswith("data.jsonl, row 7: ") and "\n" not in str(error.value)
    with pytest.raises(JudgeError, match=message):
        build_judge("ifeval", prompts={"Q": ("data.jsonl, row 7", record)})



def test_values_the_checker_keeps_are_accepted_and_judged_the_same_at_every_verdict():
    """IFEval's own edge values (exactly 0 bullets, the last paragraph) are kept; a verdict leaves the caller's
    `random` as it was, and so does the builder, whose draws a verdict keeps (IFEval's checker alone can draw
    paragraph n + 1 of n)."""
    bullets = parse_prompt({"prompt": "Q", "instruction_id_list": ["detectable_format:number_bullet_lists"],
                            "kwargs": [{"num_bullets": 0}]}, "row 0")
    last = parse_prompt({"prompt": "Q", "instruction_id_list": ["length_constraints:nth_paragraph_first_word"],
                         "kwargs": [{"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "paris"}]}, "row 1")
    random.seed(3)
    state = random.getstate()
    assert [verdicts(bullets, "No list here.")[0] for _ in range(20)] == [[True]] * 20
    assert [verdicts(last, "Cities.\n\nParis is big.")[0] for _ in range(20)] == [[True]] * 20
    assert random.getstate() == state
    repeat = constrained_prompts(["Name a fruit."], ["combination:repeat_prompt"], seed=0)[0]
    assert repeat.kwargs == ({"prompt_to_repeat": "Name a fruit."},) and repeat.prompt.startswith("Name a fruit. First")
    assert verdicts(repeat, "Name a fruit. Apple.")[0] == [True] and verdicts(repeat, "Apple.")[0] == [False]
    for seed in range(40):
        _, args = sampled_constraint("length_constraints:nth_paragraph_first_word", seed)
        assert 1 <= args["nth_paragraph"] <= args["num_paragraphs"]
        parse_prompt({"prompt": "Q", "instruction_id_list": ["length_constraints:nth_paragraph_first_word"],
                      "kwargs": [args]}, f"seed {seed}")


def test_a_checker_without_its_nltk_data_names_the_download(monkeypatch):
    monkeypatch.setattr("dpo.ifeval.nltk_has", lambda resource: False)
    row = {"prompt": "Q", "instruction_id_list": ["length_constraints:number_sentences"],
           "kwargs": [{"num_sentences": 3, "relation": "less than"}]}
    with pytest.raises(IFEvalError, match="needs nltk's tokenizers/punkt_tab data: python -m nltk.downloader punkt_tab"):
        parse_prompt(row, "row 0")  # nltk 3.9+ (if-verifiable's) reads punkt_tab for the sentence checker too
    # python -m dpo.ifeval refuses the type before it writes prompts that parse_prompt would then refuse
    with pytest.raises(IFEvalError, match=r"^--types length_constraints:number_sentences: its checker needs nltk's "
                                          r"tokenizers/punkt_tab data: python -m nltk.downloader punkt_tab$"):
        constrained_prompts(["Name a fruit."], ["punctuation:no_comma", "length_constraints:number_sentences"], 0)
    monkeypatch.undo()
    if nltk_has("tokenizers/punkt_tab"):
        return  # the checker's own lookup below needs the data to be missing
    monkeypatch.setattr("dpo.ifeval.nltk_has", lambda resource: True)  # a resource the table does not name
    with pytest.raises(IFEvalError, match="the length_constraints:number_sentences checker needs nltk data it cannot "
                                          "find: python -m nltk.downloader punkt_tab$"):
        parse_prompt(row, "row 0")

def test_the_ifeval_judge_needs_prompts_with_ifeval_fields():
    with pytest.raises(JudgeError, match="needs prompts that carry IFEval's fields"):
        build_judge("ifeval")


def test_the_builder_keeps_evaluation_instructions_out_of_training_and_uses_the_checkers_descriptions(tmp_path):
    instructions = [f"Tell me about city number {i}." for i in range(60)] + ["Tell me about city number 3."]
    train, evaluation = split_instructions(instructions, 12, seed=5)
    assert len(train) == 48 and len(evaluation) == 12 and not set(train) & set(evaluation)
    assert split_instructions(instructions, 12, seed=5) == (train, evaluation)  # seeded
    prompts = constrained_prompts(train, DEFAULT_TYPES, seed=1, per_instruction=2)
    assert len(prompts) == 96 and prompts == constrained_prompts(train, DEFAULT_TYPES, seed=1, per_instruction=2)
    counts = {t: sum(p.instruction_id_list == (t,) for p in prompts) for t in DEFAULT_TYPES}
    assert max(counts.values()) - min(counts.values()) <= 1  # the types dealt in turn
    for p in prompts[:20]:
        type_id, args = p.instruction_id_list[0], p.kwargs[0]
        checker = registry.INSTRUCTION_DICT[type_id](type_id)
        assert p.prompt == f"{p.extra['source_instruction']} {checker.build_description(**args)}"
    state = random.getstate()
    sampled_constraint("keywords:existence", 3)
    assert random.getstate() == state  # the checkers' use of the global RNG is undone
    with pytest.raises(IFEvalError, match="--eval-instructions must be between 1 and 59"):
        split_instructions(instructions, 60, seed=0)
    with pytest.raises(IFEvalError, match="0 distinct single-turn instructions: the builder needs at least 2"):
        split_instructions([], 10, seed=0)  # e.g. generate.py's {"instruction": ...} rows, which train.py does not read


def test_the_builder_command_writes_ifeval_rows_split_by_instruction(tmp_path, capsys):
    source = tmp_path / "pairs.jsonl"
    source.write_text("".join(json.dumps({"prompt": f"Name thing {i}.", "chosen": "a", "rejected": "b"}) + "\n"
                              for i in range(30)))
    assert main(["--instructions", str(source), "--out-dir", str(tmp_path / "out"), "--eval-instructions", "10"]) == 0
    train = [json.loads(line) for line in (tmp_path / "out" / "train.jsonl").read_text().splitlines()]
    evaluation = [json.loads(line) for line in (tmp_path / "out" / "eval.jsonl").read_text().splitlines()]
    assert (len(train), len(evaluation)) == (20, 10)
    assert not {r["source_instruction"] for r in train} & {r["source_instruction"] for r in evaluation}
    assert all(set(r) >= {"key", "prompt", "instruction_id_list", "kwargs"} for r in train + evaluation)
    assert all(parse_prompt(r, "row") for r in train + evaluation)
    assert "20 prompts from 20 instructions" in capsys.readouterr().out
    held_out = [json.loads(line) for line in (tmp_path / "out" / "heldout_pairs.jsonl").read_text().splitlines()]
    assert sorted(r["prompt"] for r in held_out) == sorted(r["source_instruction"] for r in evaluation)



@pytest.mark.parametrize("form", ["recipe", "hh", "messages"])
def test_the_builder_finds_the_held_out_pairs_of_every_format_by_their_instruction(tmp_path, form):
    def record(i):
        text = f"Name thing {i}."
        if form == "recipe":
            return {"prompt": f"### Human: {text}\n\n### Assistant:", "chosen": " a", "rejected": " b"}
        if form == "hh":
            return {"chosen": f"\n\nHuman: {text}\n\nAssistant: a", "rejected": f"\n\nHuman: {text}\n\nAssistant: b"}
        return {"chosen": [{"role": "user", "content": text}, {"role": "assistant", "content": "a"}],
                "rejected": [{"role": "user", "content": text}, {"role": "assistant", "content": "b"}]}

    records = [record(i) for i in range(30)] + [record(i) for i in range(5)]  # five instructions with two pairs
    source = tmp_path / "pairs.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "out"
    assert main(["--instructions", str(source), "--out-dir", str(out), "--eval-instructions", "10"]) == 0
    evaluation = {json.loads(line)["source_instruction"] for line in (out / "eval.jsonl").read_text().splitlines()}
    held_out = [json.loads(line) for line in (out / "heldout_pairs.jsonl").read_text().splitlines()]
    expected = [r for r in records if f"Name thing {records.index(r)}." in evaluation]
    assert held_out == expected and len(expected) >= 10  # the records as they were, each pair of an eval instruction


def test_the_builder_reads_the_split_it_is_given_and_drops_an_earlier_builds_held_out_pairs(tmp_path, capsys):
    pairs = [{"prompt": f"Name thing {i}.", "chosen": "a", "rejected": "b"} for i in range(30)]
    source = tmp_path / "splits.json"
    source.write_text(json.dumps({"train": pairs, "test": pairs[:20]}))
    out = tmp_path / "out"
    with pytest.raises(IFEvalError, match=r"splits.json: has splits \(train, test\); choose one with --split"):
        main(["--instructions", str(source), "--out-dir", str(out), "--eval-instructions", "10"])
    with pytest.raises(IFEvalError, match=r"no split 'dev' \(available: train, test\)"):
        main(["--instructions", str(source), "--out-dir", str(out), "--eval-instructions", "10", "--split", "dev"])
    assert main(["--instructions", str(source), "--out-dir", str(out), "--eval-instructions", "10",
                 "--split", "test"]) == 0
    assert len((out / "train.jsonl").read_text().splitlines()) == 10  # the test split's 20 instructions, 10 held out
    assert len((out / "heldout_pairs.jsonl").read_text().splitlines()) == 10
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Say {i}."}) + "\n" for i in range(30)))
    with pytest.raises(IFEvalError, match="a single file has no splits; leave out --split test"):
        main(["--instructions", str(prompts), "--out-dir", str(out), "--eval-instructions", "10", "--split", "test"])
    assert main(["--instructions", str(prompts), "--out-dir", str(out), "--eval-instructions", "10"]) == 0
    assert not (out / "heldout_pairs.jsonl").exists()  # prompts alone: the earlier build's pairs would mislead
    assert "heldout_pairs.jsonl: removed" in capsys.readouterr().out


def test_the_builder_checks_its_flags_first_and_writes_its_files_together(tmp_path):
    """A --out-dir that is a file, or --types that name none, is one line before any work; the files are written
    beside themselves and renamed together: a write that fails leaves the earlier build whole and no temporary."""
    from dpo.ifeval import write_files

    source = tmp_path / "pairs.jsonl"
    source.write_text("".join(json.dumps({"prompt": f"Name thing {i}.", "chosen": "a", "rejected": "b"}) + "\n"
                              for i in range(30)))
    (tmp_path / "file").write_text("x")
    with pytest.raises(IFEvalError, match="--out-dir .*file: is not a directory"):
        main(["--instructions", str(source), "--out-dir", str(tmp_path / "file")])
    with pytest.raises(IFEvalError, match="--types ',' names no constraint type"):
        main(["--instructions", str(source), "--out-dir", str(tmp_path / "out"), "--types", ","])
    with pytest.raises(DataError, match="file not found"):
        main(["--instructions", str(tmp_path / "missing.jsonl"), "--out-dir", str(tmp_path / "out")])
    out = tmp_path / "out"
    assert not out.exists()  # checked, not created: a command that fails leaves no empty directory
    write_files({out / "train.jsonl": [{"a": 1}], out / "eval.jsonl": [{"b": 2}]})
    assert stat.S_IMODE((out / "train.jsonl").stat().st_mode) == 0o644  # not mkstemp's private 0600
    (out / "sub").write_text("a file where the next file's directory is needed")
    with pytest.raises(IFEvalError, match="cannot be written"):
        write_files({out / "train.jsonl": [{"a": 3}], out / "sub" / "eval.jsonl": [{"b": 4}]})
    assert (out / "train.jsonl").read_text() == '{"a": 1}\n'  # not replaced: the set was not complete
    assert sorted(p.name for p in out.iterdir()) == ["eval.jsonl", "sub", "train.jsonl"]  # no temporary left

def test_the_report_counts_prompt_and_instruction_level_per_type_with_wilson_intervals():
    prompts = [IFEvalPrompt("a", ("punctuation:no_comma",), ({},)),
               IFEvalPrompt("b", ("punctuation:no_comma", "change_case:english_lowercase"), ({}, {})),
               IFEvalPrompt("c", ("change_case:english_lowercase",), ({},))]
    judge = IFEvalJudge(prompts)
    answers = ["the capital of france is paris, a large and beautiful city.",  # fails
               "the capital of france is paris and it is a large and beautiful city.",  # both pass
               "**Title**\nthe capital of france is paris and it is a large and beautiful city."]  # loose only
    summary = ifeval_summary(judge, ["a", "b", "c"], answers)
    assert (summary["prompt_strict"]["passed"], summary["prompt_strict"]["n"]) == (1, 3)
    assert (summary["prompt_loose"]["passed"], summary["instruction_strict"]["passed"]) == (2, 2)
    assert (summary["instruction_strict"]["n"], summary["instruction_loose"]["passed"]) == (4, 3)
    lowercase = summary["types"]["change_case:english_lowercase"]
    assert (lowercase["prompt_strict"]["passed"], lowercase["prompt_loose"]["passed"], lowercase["prompt_strict"]["n"]) \
        == (1, 2, 2)
    assert summary["types"]["punctuation:no_comma"]["instruction_strict"]["passed"] == 1
    low, high = wilson_interval(1 / 3, 3)
    assert summary["prompt_strict"]["low"] == low and summary["prompt_strict"]["high"] == high
    assert proportion(0, 0) == {"rate": 0.0, "low": 0.0, "high": 1.0, "passed": 0, "n": 0}
    # instruction level: prompt b's two constraints are one cluster, (0, 1), (2, 2), (0, 1): p = 1/2 and
    # V = (0.25 + 1 + 0.25) / 16, so the interval is Wilson's over p (1 - p) / V = 8/3 trials, not 4
    assert summary["instruction_strict"]["effective_n"] == pytest.approx(8 / 3)
    wide = wilson_interval(0.5, 8 / 3)
    assert (summary["instruction_strict"]["low"], summary["instruction_strict"]["high"]) == pytest.approx(wide)
    assert wide[1] - wide[0] > (lambda lo, hi: hi - lo)(*wilson_interval(0.5, 4))
    table = format_ifeval(summary, summary, "after", "before")
    assert "prompt-level strict" in table and "change_case:english_lowercase" in table
    assert f"{1 / 3:.3f} [{low:.3f}, {high:.3f}]" in table


def test_a_prompts_constraints_count_as_one_trial_when_they_pass_and_fail_together():
    """Closed forms of the clustered interval: k prompts whose 2 constraints always agree carry the information of
    k trials (n_eff = k, not 2k); prompts of one constraint give the plain Wilson interval; never narrower than
    independent trials (constraints that disagree more than chance are capped at n)."""
    together = clustered_proportion([(2, 2)] * 6 + [(0, 2)] * 14)
    assert (together["passed"], together["n"], together["effective_n"]) == (12, 40, pytest.approx(20.0))
    assert (together["low"], together["high"]) == pytest.approx(wilson_interval(0.3, 20))
    single = clustered_proportion([(1, 1)] * 3 + [(0, 1)] * 7)
    assert (single["low"], single["high"], single["effective_n"]) == (*wilson_interval(0.3, 10), 10)
    apart = clustered_proportion([(1, 2)] * 10)  # every prompt passes exactly one of two: V = 0, capped at n
    assert apart["effective_n"] == 20 and (apart["low"], apart["high"]) == pytest.approx(wilson_interval(0.5, 20))
    assert clustered_proportion([]) == {**proportion(0, 0), "effective_n": 0}


@pytest.mark.slow
@pytest.mark.parametrize("mode, sampled", [(("--online",), 4), (("--iterations", "2"), 8)], ids=["online", "iterative"])
def test_online_and_iterative_dpo_train_on_ifeval_prompts_judged_by_ifeval(tmp_path, mode, sampled):
    """IFEval's input_data format as the dataset of an online or iterative run and as --eval-prompts of --eval-judge
    ifeval: every prompt is an instruction (no pairs needed), the judge's pairs are (most constraints followed,
    fewest), a prompt whose samples tie is skipped, and the win rate while training is IFEval's."""
    make_model_dir(tmp_path / "model")
    rows = [{"key": i, "prompt": f"what color is the {word}? Do not use any commas.",
             "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}
            for i, word in enumerate(["sun", "moon", "cat", "dog", "sun please", "moon please", "cat please",
                                      "dog please", "big cat", "small dog", "fast cat", "slow dog"])]
    (tmp_path / "ifeval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = train_tiny(tmp_path, "run", *mode, "--judge", "ifeval", "--num-samples", "4",
                     "--sample-max-new-tokens", "8", "--batch-size", "4", "--micro-batch-size", "4",
                     "--max-steps", "2", "--eval-steps", "2", "--eval-generate", "3", "--eval-judge", "ifeval",
                     "--eval-prompts", str(tmp_path / "ifeval.jsonl"), "--eval-max-new-tokens", "8",
                     dataset="ifeval.jsonl", test_size="4")
    records = [r for r in run_metrics(out, "train") if "online/pairs" in r]
    assert len(records) == 2  # each step (online) or each round (iterative) samples and judges
    assert all(r["online/pairs"] + sampled * r["online/ties"] == sampled for r in records)  # a pair or a tie each
    evals = [r for r in run_metrics(out, "eval") if "generate/win_rate" in r]
    assert len(evals) == 1 and evals[0]["generate/win_rate_low"] <= evals[0]["generate/win_rate"] \
        <= evals[0]["generate/win_rate_high"]
    [shown] = run_metrics(out, "samples")
    assert len(shown["rows"]) == 3
    own = [ifeval_own(prompt("punctuation:no_comma", {}, text), policy) for text, _, policy, _ in shown["rows"]]
    # the judge's score from IFEval's own verdicts on the 3 answers: 1 strict, 0.5 loose only
    expected = sum(1.0 if strict[0] else 0.5 if loose[0] else 0.0 for strict, loose in own) / 3
    assert evals[0]["generate/score"] == pytest.approx(expected)


KEYWORDS = IFEvalPrompt("Translate it into a formula. Include keywords ['horse', 'problem'] in the response.",
                         ("keywords:existence",), ({"keywords": ["horse", "problem"]},))
QUOTATION = IFEvalPrompt("Are there any free SAST tools? Wrap your entire response with double quotation marks.",
                         ("startend:quotation",), ({},))
LOWERCASE = IFEvalPrompt("Name a color. Your entire response should be in English, and in all lowercase letters. No "
                         "capital letters are allowed.", ("change_case:english_lowercase",), ({},))


@pytest.mark.parametrize("prompt, copy", [
    (KEYWORDS, "include keywords ['horse', 'problem'] in the response."),  # answers seen from a trained policy
    (QUOTATION, '"Are there any free SAST tools? Wrap your entire response with double quotation marks."'),
    (LOWERCASE, "your entire response should be in english, and in all lowercase letters. no capital letters are "
                "allowed."),
], ids=["keywords", "quotation", "lowercase"])
def test_an_answer_copying_its_constraint_passes_ifeval_and_scores_0_with_the_no_echo_judge(prompt, copy):
    """The copies pass IFEval's checkers without answering; `ifeval-no-echo` scores them 0 and does not repair them,
    while its checks stay IFEval's verdicts; an answer that follows the constraint in its own words is untouched."""
    assert verdicts(prompt, copy)[0] == [True]
    assert echoed_constraint(prompt, copy) in constraint_descriptions(prompt)
    records = {prompt.prompt: ("prompts.jsonl, row 0", prompt.to_row())}
    plain, no_echo = build_judge("ifeval", prompts=records), build_judge("ifeval-no-echo", prompts=records)
    assert isinstance(no_echo, IFEvalNoEchoJudge) and no_echo.name == "ifeval-no-echo"
    assert (plain.score(prompt.prompt, copy), no_echo.score(prompt.prompt, copy)) == (1.0, 0.0)
    assert no_echo.checks(prompt.prompt, copy) == plain.checks(prompt.prompt, copy) == {"strict": True, "loose": True}
    assert no_echo.compare(prompt.prompt, copy, "Something else entirely.") == 0.5  # both 0 now: a tie
    assert no_echo.repair(prompt.prompt, copy.strip('"') + " More words.") is None
    answer = {KEYWORDS.prompt: "The horse problem is solved with =IF(C7=1, 2, 3).",
              QUOTATION.prompt: '"Semgrep is free."', LOWERCASE.prompt: "red is a color."}[prompt.prompt]
    assert echoed_constraint(prompt, answer) is None
    assert no_echo.score(prompt.prompt, answer) == plain.score(prompt.prompt, answer) == 1.0
    missing = {KEYWORDS.prompt: "It is =IF(C7=1, 2, 3).", QUOTATION.prompt: "Semgrep is free.",
               LOWERCASE.prompt: "Red is a color."}[prompt.prompt]
    assert no_echo.repair(prompt.prompt, missing) == plain.repair(prompt.prompt, missing)


TITLE = IFEvalPrompt("Suggest some audiobooks. Your answer must contain a title, wrapped in double angular brackets, "
                      "such as <<poem of joy>>.", ("detectable_format:title",), ({},))


END_PHRASE = IFEvalPrompt("Name a color. Finish your response with this exact phrase Is there anything else I can help "
                          "with?. No other words should follow this phrase.", ("startend:end_checker",),
                          ({"end_phrase": "Is there anything else I can help with?"},))
NO_COMMA = IFEvalPrompt("Name a color. In your entire response, refrain from the use of any commas.",
                        ("punctuation:no_comma",), ({},))
POSTSCRIPT = IFEvalPrompt("Name a color. At the end of your response, please explicitly add a postscript starting with "
                          "P.S.", ("detectable_content:postscript",), ({"postscript_marker": "P.S."},))


@pytest.mark.parametrize("prompt, copy", [
    (KEYWORDS, "INCLUDE   KEYWORDS ['horse', 'problem'] IN THE RESPONSE"),  # case and spacing
    (NO_COMMA, "In your entire response refrain from the use of any commas."),  # its comma dropped
    (QUOTATION, '"Wrap your **entire** response with double quotation marks."'),  # markdown inside
    (LOWERCASE, "your entire response should be in english and in all lowercase letters."),  # one sentence of two
    (POSTSCRIPT, "At the end of your response please explicitly add a postscript starting with P.S."),
    # seen from a trained policy, with the keywords of its prompt
    (KEYWORDS, "Rewrite the response to include keywords ['horse', 'problem'] in the title and in the response."),
], ids=["case", "comma-dropped", "bold", "first-sentence", "postscript", "paraphrased-around"])
def test_a_near_copy_of_a_constraint_passes_ifeval_and_is_an_echo(prompt, copy):
    assert verdicts(prompt, copy)[0] == [True]
    assert echoed_constraint(prompt, copy) in constraint_descriptions(prompt)


def test_an_echo_is_six_consecutive_words_of_the_description_outside_what_the_answer_must_write():
    assert ECHO_RUN == 6
    assert echoed_constraint(KEYWORDS, "Include keywords in the response.") is None  # 4 words in a row at most
    assert echoed_constraint(KEYWORDS, "The horse problem: include keywords horse as asked.") is None
    assert echoed_constraint(KEYWORDS, "You asked me to include keywords horse problem in the text.") is not None
    # 5 words of a description are plain English: answers of alpacaeval-phi2-prefs hold them
    trip = "Take the ferry. At the end of your trip, have dinner by the harbour.\n\nP.S. Book the dinner early."
    assert verdicts(POSTSCRIPT, trip)[0] == [True] and echoed_constraint(POSTSCRIPT, trip) is None
    assert echoed_constraint(NO_COMMA, "Refrain from the use of tobacco.") is None
    # the end phrase is 8 words of the description, which the answer must end with: not a copy
    answer = "Red. Is there anything else I can help with?"
    assert verdicts(END_PHRASE, answer)[0] == [True] and echoed_constraint(END_PHRASE, answer) is None
    assert echoed_constraint(END_PHRASE, "Red. No other words should follow this phrase.") is not None
    assert echoed_constraint(END_PHRASE, "Red. With this exact phrase Is there anything else I can help with?") \
        is not None  # words of the description around the phrase


def test_echo_never_applies_where_the_prompt_asks_to_be_repeated():
    repeat = IFEvalPrompt("What is the capital of France? First repeat the request word for word without change, "
                          "then give your answer", ("combination:repeat_prompt",),
                          ({"prompt_to_repeat": "What is the capital of France?"},))
    assert echoed_constraint(repeat, repeat.prompt + " Paris.") is None
    # a description the prompt does not state word for word (IFEval's own prompts often paraphrase) is not checked
    paraphrased = IFEvalPrompt("Name a fruit, and put the whole answer in double quotes.", ("startend:quotation",),
                               ({},))
    assert constraint_descriptions(paraphrased) == []
    state = random.getstate()
    constraint_descriptions(KEYWORDS)
    assert random.getstate() == state


def test_the_no_loop_judge_scores_a_looping_answer_0_and_repairs_neither_it_nor_into_a_loop():
    """A loop passes IFEval's format checkers without answering (a title repeated to the token budget): the
    `ifeval-no-echo-no-loop` judge scores it 0 and does not repair it, nor repair an answer into one; its checks stay
    IFEval's verdicts, and an answer that neither loops nor copies scores and repairs as with `ifeval-no-echo`."""
    records = {p.prompt: (f"prompts.jsonl, row {i}", p.to_row()) for i, p in enumerate([TITLE, LOWERCASE, KEYWORDS])}
    no_echo, no_loop = (build_judge(spec, prompts=records) for spec in ("ifeval-no-echo", "ifeval-no-echo-no-loop"))
    assert isinstance(no_loop, IFEvalNoEchoNoLoopJudge) and no_loop.name == "ifeval-no-echo-no-loop"
    loop = "<<poem of joy>>\n\n" + "The poem of joy is a poem about joy and love.\n\n" * 4
    assert repeats_itself(loop) and verdicts(TITLE, loop)[0] == [True]
    assert (no_echo.score(TITLE.prompt, loop), no_loop.score(TITLE.prompt, loop)) == (1.0, 0.0)
    assert no_loop.checks(TITLE.prompt, loop) == {"strict": True, "loose": True}
    assert no_loop.compare(TITLE.prompt, "<<Dune>> is read well.", loop) == 1.0
    untitled = loop.removeprefix("<<poem of joy>>\n\n")  # misses the title; the repair would put one before the loop
    assert no_echo.repair(TITLE.prompt, untitled) is not None and no_loop.repair(TITLE.prompt, untitled) is None
    upper = "Red Is A Color."  # neither loops nor copies: both judges agree
    assert no_loop.score(LOWERCASE.prompt, upper) == no_echo.score(LOWERCASE.prompt, upper) == 0.0
    assert no_loop.repair(LOWERCASE.prompt, upper) == no_echo.repair(LOWERCASE.prompt, upper) == "red is a color."
    copy = "Include keywords ['horse', 'problem'] in the response."
    assert no_loop.score(KEYWORDS.prompt, copy) == 0.0 and no_loop.repair(KEYWORDS.prompt, copy + " More.") is None


def test_the_report_counts_answers_copying_a_constraint_and_strict_without_copies_or_loops():
    judge = IFEvalJudge([KEYWORDS, QUOTATION, LOWERCASE, TITLE])
    answers = ["include keywords ['horse', 'problem'] in the response.",  # strict by copying
               '"Semgrep is free."',  # strict in its own words
               "Red is a color.",  # misses
               "<<poem of joy>>\n\n" + '"<<poem of joy>>"\n\n' * 12]  # strict by looping
    assert repeats_itself(answers[3]) and echoed_constraint(TITLE, answers[3]) is None and verdicts(TITLE, answers[3])[0]
    policy = ifeval_summary(judge, [KEYWORDS.prompt, QUOTATION.prompt, LOWERCASE.prompt, TITLE.prompt], answers)
    assert policy["prompt_strict"]["passed"] == 3
    assert (policy["copies_constraint"]["passed"], policy["prompt_strict_no_copy"]["passed"]) == (1, 2)
    assert policy["prompt_strict_no_copy_or_loop"]["passed"] == 1
    table = format_ifeval(policy, policy, "after", "before")
    assert f"answers copying a constraint's description: policy {1 / 4:.3f}" in table
    assert f"prompt-level strict, a copy counted as a miss: policy {2 / 4:.3f}" in table
    assert f"prompt-level strict, a copy or a loop counted as a miss: policy {1 / 4:.3f}" in table


def test_the_evaluate_cli_reports_ifeval_for_both_models_and_writes_the_json(tmp_path, capsys, monkeypatch):
    """`python -m dpo.evaluate --judge ifeval --prompts FILE --output F.json` on IFEval rows: the four accuracies of
    each model counted from its answers, per type, with Wilson intervals, in the table, the JSON line and the file."""
    from dpo import evaluate

    make_model_dir(tmp_path / "policy", seed=1)
    make_model_dir(tmp_path / "reference", seed=2)
    rows = [{"key": 1, "prompt": "Name a fruit. Do not use any commas.",
             "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]},
            {"key": 2, "prompt": "Name a color. Your entire response should be in English, and in all lowercase "
             "letters. No capital letters are allowed.", "instruction_id_list": ["change_case:english_lowercase"],
             "kwargs": [{}]},
            {"key": 3, "prompt": "Name a city. Do not use any commas. Your entire response should be in English, and "
             "in all lowercase letters. No capital letters are allowed.",
             "instruction_id_list": ["punctuation:no_comma", "change_case:english_lowercase"], "kwargs": [{}, {}]}]
    (tmp_path / "input_data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    answers = {"policy": ["An apple.", "**Red**\nred is a color.", "paris is a city."],  # 2 strict, 3 loose
               "reference": ["Apple, pear.", "Red.", "Paris, France."]}  # none
    monkeypatch.setattr(evaluate, "generate_batch", lambda model, tokenizer, instructions, decoding, **kwargs:
                        answers[kwargs["description"].split()[0]])
    out_file = tmp_path / "eval" / "ifeval.json"
    assert evaluate.cli(["--model", str(tmp_path / "policy"), "--reference", str(tmp_path / "reference"),
                         "--judge", "ifeval", "--prompts", str(tmp_path / "input_data.jsonl"), "--samples", "0",
                         "--no-progress", "--output", str(out_file)]) == 0
    out = capsys.readouterr().out
    result = json.loads(out.strip().splitlines()[-1])
    assert json.loads(out_file.read_text())["summary"] == result
    assert [c["policy_output"] for c in json.loads(out_file.read_text())["comparisons"]] == answers["policy"]
    policy, reference = result["ifeval"]["policy"], result["ifeval"]["reference"]
    counted = {level: (policy[level]["passed"], policy[level]["n"]) for level in
               ("prompt_strict", "prompt_loose", "instruction_strict", "instruction_loose")}
    assert counted == {"prompt_strict": (2, 3), "prompt_loose": (3, 3), "instruction_strict": (3, 4),
                       "instruction_loose": (4, 4)}
    assert all(reference[level]["passed"] == 0 for level in counted)
    assert (policy["prompt_strict"]["low"], policy["prompt_strict"]["high"]) == pytest.approx(wilson_interval(2 / 3, 3))
    lowercase = policy["types"]["change_case:english_lowercase"]
    assert [lowercase[level]["passed"] for level in ("prompt_strict", "prompt_loose")] == [1, 2]
    assert set(policy["types"]) == {"punctuation:no_comma", "change_case:english_lowercase"}
    assert (result["policy_strict"], result["reference_strict"]) == pytest.approx((2 / 3, 0.0))
    table = out[out.index("IFEval"):]
    assert f"{2 / 3:.3f} [{wilson_interval(2 / 3, 3)[0]:.3f}," in table and "instruction-level loose" in table


def test_prompts_that_differ_only_in_white_space_need_the_same_constraints():
    """The judge reads a sample's prompt stripped: "X" and "X " with other constraints would be judged alike."""
    comma = {"prompt": "Name a fruit.", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}
    capitals = {**comma, "prompt": "Name a fruit. ", "instruction_id_list": ["change_case:english_capital"]}
    with pytest.raises(JudgeError, match="data.jsonl, row 2: its prompt is data.jsonl, row 0's but for the white "
                                         "space around it, with other constraints"):
        build_judge("ifeval", prompts={"Name a fruit.": ("data.jsonl, row 0", comma),
                                       "Name a fruit. ": ("data.jsonl, row 2", capitals)})
    same = build_judge("ifeval", prompts={"Name a fruit.": ("data.jsonl, row 0", comma),
                                          " Name a fruit.": ("data.jsonl, row 1", {**comma, "prompt": " Name a fruit."})})
    assert same.prompt("Name a fruit. ").instruction_id_list == ("punctuation:no_comma",)


def test_a_prompt_given_twice_with_other_constraints_is_one_line_not_judged_by_the_last():
    """The judge knows a prompt by its text: a later row's constraints used to replace an earlier one's silently."""
    rows = [{"instruction": "What is 3 plus 4?", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]},
            {"instruction": "What is 3 plus 4?", "instruction_id_list": ["startend:quotation"], "kwargs": [{}]}]
    for spec in ("ifeval", "ifeval-no-echo", "ifeval-no-echo-no-loop"):
        with pytest.raises(JudgeError, match=r"^p.jsonl, row 1: its instruction is row 0's, with other constraints"):
            prompt_records(rows, "p.jsonl", spec)
    same = prompt_records([rows[0], dict(rows[0])], "p.jsonl", "ifeval")  # the same row twice: one prompt
    assert list(same) == ["What is 3 plus 4?"] and same["What is 3 plus 4?"][0] == "p.jsonl, row 0"
    assert list(prompt_records(rows, "p.jsonl", "demo")) == ["What is 3 plus 4?"]  # another judge reads no constraints


def test_a_record_whose_prompt_is_written_as_a_conversation_is_judged_by_its_turns_text():
    """Sampling answers the user turn of "### Human: ...\\n\\n### Assistant:" (or HH's text): the judge knows the
    record by that text, the instruction it is given, and checks the constraints against it."""
    record = {"prompt": "### Human: what color is the sun? Do not use any commas.\n\n### Assistant:",
              "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}], "chosen": "blue", "rejected": "red, no"}
    text = "what color is the sun? Do not use any commas."
    assert list(instruction_records([record])[0]) == [text]
    judge = IFEvalJudge.from_records({text: ("f.jsonl, row 0", record)})
    assert judge.prompt(text).prompt == text and judge.score_batch([text], [["blue sky", "red, green"]]) == [[1.0, 0.0]]
