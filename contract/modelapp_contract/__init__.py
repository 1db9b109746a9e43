"""What the operator and the serving app agree on, in one place: standard library only, imported by both."""
