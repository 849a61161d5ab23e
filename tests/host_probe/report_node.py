"""The shape every read-out node of the probe pack shares: an output node in the tests' category whose `report`
returns {"ui": {"text": [...]}}, which the API tests read from the prompt's history."""


class ReportNode:
    CATEGORY = "DiT Control tests"
    FUNCTION = "report"
    RETURN_TYPES = ()
    OUTPUT_NODE = True
