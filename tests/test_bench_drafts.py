"""Prompt-lookup drafting as `make bench`'s draft study replays it (bench/draft_steps.py).

Tier: plain unit tests on hand-made token lists; the study itself runs the real model in `make bench`.
"""

from bench.draft_steps import prompt_lookup_draft, replay_drafts


def test_a_draft_is_what_followed_the_latest_earlier_occurrence_of_the_tail():
    context = [1, 2, 3, 9, 1, 2, 3, 7, 8, 5, 1, 2, 3]
    assert prompt_lookup_draft(context, draft_tokens=2, shortest=1) == [7, 8]


def test_a_longer_tail_wins_over_a_shorter_one_and_none_recurring_gives_no_draft():
    context = [4, 5, 6, 4, 2, 5, 6, 7, 4, 5, 6]
    assert prompt_lookup_draft(context, draft_tokens=1, shortest=1) == [4]  # 4 5 6 -> 4, not 5 6 -> 7
    assert prompt_lookup_draft([1, 2, 3, 4], draft_tokens=3, shortest=1) == []
    assert prompt_lookup_draft([1, 2, 1, 3, 1], draft_tokens=3, shortest=2) == []  # only a 1-token tail recurs


def test_an_answer_that_repeats_the_prompt_is_replayed_in_fewer_steps_than_tokens():
    prompt = [10, 11, 12, 13, 14, 15]
    steps, drafts = replay_drafts(prompt, [12, 13, 14, 15], draft_tokens=3, shortest=1)
    # Step 1: no tail of the prompt recurs, so it yields 12 alone. Step 2: 12 occurred in the prompt,
    # its followers 13 14 15 are drafted, all three are right, and the step yields them plus one more.
    assert (steps, drafts) == (2, [0, 3])


def test_an_answer_no_draft_predicts_takes_one_step_per_token():
    steps, drafts = replay_drafts([1, 2, 3], [4, 5, 6, 7], draft_tokens=3, shortest=1)
    assert (steps, drafts) == (4, [0, 0, 0, 0])
