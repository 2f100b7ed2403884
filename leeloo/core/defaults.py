"""
The relay's defaults and the close codes it documents.
"""

# Close codes the relay documents (application reasons live in 4000-4999).
CLOSE_GOING_AWAY = 1001
CLOSE_INTERNAL_ERROR = 1011
CLOSE_REPLACED = 4001
CLOSE_BIND_TIMEOUT = 4008
CLOSE_ABUSE = 4029

TELEGRAM_DEVICE_ID = "telegram"
# A device back in its crew within this many seconds was never away, as
# far as the crew hears.
PRESENCE_GRACE = 10.0
TOKEN_TTL = 3600.0
DAY = 86400.0
EPHEMERAL_AGE = 600.0
BIND_TIMEOUT = 60.0
MiB = 1024 * 1024
CREW_LOG_BYTES = 16 * MiB
STORE_QUEUE_BYTES = 8 * MiB
# Random codes tried at each length before a longer one; the longest.
CODE_TRIES = 8
MAX_GENERATED_CODE_LENGTH = 16
