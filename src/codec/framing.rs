//! The Confluent wire format: byte 0 is `0x00`, bytes 1..5 the big-endian
//! schema id, then the Avro binary body. Pure and panic-free on any input.

/// The magic byte of the Confluent wire format.
pub const MAGIC: u8 = 0;
/// Magic byte plus schema id.
pub const HEADER_LEN: usize = 5;

/// A framed payload, borrowed from the record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Framed<'a> {
    pub schema_id: u32,
    pub body: &'a [u8],
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FramingError {
    #[error("empty payload")]
    Empty,
    #[error("payload of {0} bytes is shorter than the 5-byte Confluent header")]
    TooShort(usize),
    #[error("wrong magic byte 0x{0:02x} (expected 0x00): not Confluent-framed Avro")]
    WrongMagic(u8),
}

/// Splits a framed payload into schema id and body.
pub fn parse(bytes: &[u8]) -> Result<Framed<'_>, FramingError> {
    match bytes {
        [] => Err(FramingError::Empty),
        [magic, ..] if *magic != MAGIC => Err(FramingError::WrongMagic(*magic)),
        [_, a, b, c, d, body @ ..] => Ok(Framed { schema_id: u32::from_be_bytes([*a, *b, *c, *d]), body }),
        short => Err(FramingError::TooShort(short.len())),
    }
}

/// Appends the header for `schema_id` and then `body` to `out`.
pub fn frame_into(schema_id: u32, body: &[u8], out: &mut Vec<u8>) {
    out.reserve(HEADER_LEN + body.len());
    out.push(MAGIC);
    out.extend_from_slice(&schema_id.to_be_bytes());
    out.extend_from_slice(body);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_framed_payload() {
        let mut bytes = Vec::new();
        frame_into(0x0102_0304, b"avro", &mut bytes);
        assert_eq!(bytes, [0, 1, 2, 3, 4, b'a', b'v', b'r', b'o']);
        assert_eq!(parse(&bytes), Ok(Framed { schema_id: 0x0102_0304, body: b"avro" }));
        assert_eq!(parse(&[0, 0, 0, 0, 7]), Ok(Framed { schema_id: 7, body: &[] }));
    }

    #[test]
    fn rejects_bad_frames_without_panicking() {
        assert_eq!(parse(&[]), Err(FramingError::Empty));
        assert_eq!(parse(&[0]), Err(FramingError::TooShort(1)));
        assert_eq!(parse(&[0, 0, 0, 1]), Err(FramingError::TooShort(4)));
        assert_eq!(parse(b"{\"json\": true}"), Err(FramingError::WrongMagic(b'{')));
        assert_eq!(parse(&[1, 0, 0, 0, 1, 2]), Err(FramingError::WrongMagic(1)));
        // Every prefix of every short input is handled.
        for len in 0..HEADER_LEN {
            let bytes = vec![0u8; len];
            assert!(parse(&bytes).is_err(), "{len} bytes");
        }
    }
}
