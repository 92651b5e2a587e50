"""The one error every contract check raises."""


class ContractError(ValueError):
    """An event that does not match its contract (unknown type/version, bad envelope or payload)."""
