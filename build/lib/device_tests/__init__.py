"""The device harness: push an export to phones and boards, run it there, bring the results back."""
