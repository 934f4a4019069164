"""The Edgewise device agent: verify, install into A/B slots, health-check, commit or roll
back, serve inference locally. Needs no torch."""

from ._anomaly import DriftLog, denoise_images, generate_images, image_grid_png, learn_normal
from ._daemon import Agent, AgentConfig, FaultPoint
from ._detect import DetectionPrediction, draw_detections
from ._errors import (
    AgentConfigError,
    AgentError,
    AgentTransportError,
    HealthCheckFailed,
    NoModelError,
    UpdateRejected,
)
from ._local import LocalApi, LocalModel, agent_status, enroll
from ._machine import (
    REST_STATES,
    TRANSITIONS,
    WAITING_STATES,
    Event,
    State,
    next_state,
    resume_state,
)
from ._runtime import HealthReport, OnnxModel, Prediction, health_check, preprocess_image
from ._store import StateDir
from ._userinput import defer_update, submit_feedback

__all__ = [
    "REST_STATES",
    "TRANSITIONS",
    "WAITING_STATES",
    "Agent",
    "AgentConfig",
    "AgentConfigError",
    "AgentError",
    "AgentTransportError",
    "DetectionPrediction",
    "DriftLog",
    "Event",
    "FaultPoint",
    "HealthCheckFailed",
    "HealthReport",
    "LocalApi",
    "LocalModel",
    "NoModelError",
    "OnnxModel",
    "Prediction",
    "State",
    "StateDir",
    "UpdateRejected",
    "agent_status",
    "defer_update",
    "enroll",
    "denoise_images",
    "draw_detections",
    "generate_images",
    "image_grid_png",
    "learn_normal",
    "health_check",
    "next_state",
    "preprocess_image",
    "resume_state",
    "submit_feedback",
]
