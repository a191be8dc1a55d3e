"""JSON schemas the structured-output tests share (the engine tests, the vLLM lane's and the endpoint's)."""

# A quiz item: bounded strings, a fixed-size array and an enum, so that a completion that merely looks like JSON fails.
QUIZ = {"type": "object", "additionalProperties": False, "required": ["question", "options", "answer"],
        "properties": {"question": {"type": "string", "minLength": 5, "maxLength": 60},
                       "options": {"type": "array", "minItems": 4, "maxItems": 4,
                                   "items": {"type": "string", "maxLength": 20}},
                       "answer": {"type": "string", "enum": ["A", "B", "C", "D"]}}}
