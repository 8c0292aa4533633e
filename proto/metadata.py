"""gRPC call metadata that is part of the teacher contract (keys must be lower case)."""

#: Identifies a student job to the teacher's scheduler: fairness and in-flight limits are per client id.
CLIENT_ID_KEY = "atkd-client-id"
#: Carries ``Bearer <token>`` when the teacher requires authentication.
AUTHORIZATION_KEY = "authorization"
#: Names the Ray Serve application that Serve's gRPC proxy routes a call to (Ray Serve backend only).
APPLICATION_KEY = "application"


def bearer(token: str) -> str:
    """The value of :data:`AUTHORIZATION_KEY` for ``token``."""
    return f"Bearer {token}"
