"""The prompt template of the phi-2-dpo recipe.

The prompt ends with the colon of "### Assistant:"; the response starts with a space, so
prompt + response reads "### Assistant: {response}". Keeping the space on the response side keeps
the prompt/response token boundary clean for byte-level BPE (a space always starts a new token).
"""

PROMPT_TEMPLATE = "### Human: {instruction}\n\n### Assistant:"
HUMAN_TURN_PREFIX = "### Human:"


def format_prompt(instruction: str) -> str:
    return PROMPT_TEMPLATE.format(instruction=instruction)


def format_response(text: str) -> str:
    """Response text as it follows the prompt (EOS is added as a token id, not as text)."""
    return " " + text.strip()
