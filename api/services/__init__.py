"""The API's service layer: what the routes call. Routes translate HTTP to these calls and back; these modules
orchestrate the shared domain (`core`) for one use case each (submitting, presenting, streaming events)."""
