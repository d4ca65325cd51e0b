"""The benchmark prompts, shared by the locust users and the in-process cells."""

WORDS = ("the quick brown fox jumps over a lazy dog while seven wise owls count stars above "
         "quiet hills and rivers run toward distant silver seas").split()


def prompt_text(words: int, salt: int) -> str:
    body = " ".join(WORDS[(i + salt) % len(WORDS)] for i in range(words))
    return f"Continue this text for as long as you can, never stopping: {body}"
