"""Wire format v1: message types, sizes and offsets (docs/tunnel-protocol.md).

Every message starts with a 4-byte little-endian word whose low byte is the type and
whose three high bytes are reserved zero, so one ``<I`` unpack checks both at once.
"""

from __future__ import annotations

import struct

PROTOCOL_NAME = b"Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s"
PROLOGUE = b"fabricd tunnel v1"
LABEL_MAC1 = b"mac1----"
LABEL_COOKIE = b"cookie--"

TYPE_INITIATION = 1
TYPE_RESPONSE = 2
TYPE_COOKIE_REPLY = 3
TYPE_DATA = 4

MAC_LEN = 16
TAG_LEN = 16
COOKIE_LEN = 16
COOKIE_NONCE_LEN = 24

# Initiation: type(4) sender(4) noise_msg1(108) mac1(16) mac2(16)
NOISE_MSG1_LEN = 32 + (32 + TAG_LEN) + (12 + TAG_LEN)
INITIATION_LEN = 4 + 4 + NOISE_MSG1_LEN + MAC_LEN + MAC_LEN
INITIATION_NOISE = slice(8, 8 + NOISE_MSG1_LEN)
INITIATION_MAC1_AT = INITIATION_LEN - 2 * MAC_LEN
INITIATION_MAC2_AT = INITIATION_LEN - MAC_LEN

# Response: type(4) sender(4) receiver(4) noise_msg2(48) mac1(16) mac2(16)
NOISE_MSG2_LEN = 32 + TAG_LEN
RESPONSE_LEN = 4 + 4 + 4 + NOISE_MSG2_LEN + MAC_LEN + MAC_LEN
RESPONSE_NOISE = slice(12, 12 + NOISE_MSG2_LEN)
RESPONSE_MAC1_AT = RESPONSE_LEN - 2 * MAC_LEN
RESPONSE_MAC2_AT = RESPONSE_LEN - MAC_LEN

# Cookie reply: type(4) receiver(4) nonce(24) encrypted_cookie(16 + 16)
COOKIE_REPLY_LEN = 4 + 4 + COOKIE_NONCE_LEN + COOKIE_LEN + TAG_LEN

# Data: type(4) receiver(4) counter(8) ciphertext(plaintext + 16)
DATA_HEADER_LEN = 16
DATA_MIN_LEN = DATA_HEADER_LEN + TAG_LEN
NAMESPACE_LEN = 4
IPV4_MIN_LEN = 20
# Largest UDP payload over IPv4 (65535 - 20 - 8), and so the largest inner packet.
MAX_DATAGRAM = 65507
MAX_PACKET = MAX_DATAGRAM - DATA_MIN_LEN - NAMESPACE_LEN

HEADER = struct.Struct("<I")  # type + reserved
INDEX_HEADER = struct.Struct("<II")  # type + reserved, one index
RESPONSE_HEADER = struct.Struct("<III")  # type + reserved, sender, receiver
DATA_HEADER = struct.Struct("<IIQ")  # type + reserved, receiver, counter
NAMESPACE = struct.Struct(">I")  # the one big-endian field
