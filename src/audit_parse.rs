//! The streaming reader of [`super`]: one CloudTrail log file, gzipped or plain, in the S3
//! delivery format (`{"Records": [...]}`, "CloudTrail log file examples", CloudTrail User Guide)
//! or as one event per line (CloudTrail Lake and Athena exports), or a top-level array of
//! events.
//!
//! Nothing is read whole: gzip is detected by its magic bytes (RFC 1952 §2.3.1) and decoded as a
//! stream; JSON is read by serde_json from that stream with hand-written visitors, so each record
//! becomes a [`Record`] of the few fields the audit needs (every other field is skipped by
//! [`IgnoredAny`] without being kept) and is handed to the [`Sink`] before the next is read.
//! Memory per file is the decoder's buffers plus the longest single JSON string.
//!
//! Keys are matched ignoring ASCII case: Athena and other SQL engines lower-case column names
//! (`sourceipaddress`), CloudTrail itself writes camelCase (`sourceIPAddress`).

use std::fmt;
use std::io::{self, BufRead, BufReader, Read};

use flate2::read::MultiGzDecoder;
use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

/// The fields of one CloudTrail record the audit reads ("CloudTrail record contents",
/// CloudTrail User Guide). `None` when absent or `null`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(super) struct Record {
    pub event_time: Option<String>,
    pub event_source: Option<String>,
    pub event_name: Option<String>,
    pub error_code: Option<String>,
    pub error_message: Option<String>,
    pub source_ip_address: Option<String>,
    pub vpc_endpoint_id: Option<String>,
    pub recipient_account_id: Option<String>,
    pub user_identity: Option<UserIdentity>,
}

/// `userIdentity` and its `sessionContext` ("CloudTrail userIdentity element", CloudTrail User
/// Guide).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(super) struct UserIdentity {
    /// `type`, e.g. `AssumedRole`.
    pub kind: Option<String>,
    /// `arn`: `arn:aws:sts::<account>:assumed-role/<role>/<session name>` for a role session.
    pub arn: Option<String>,
    /// `invokedBy` is present and not empty: "only present when a request is made by an AWS
    /// service".
    pub invoked_by: bool,
    /// `sessionContext.sourceIdentity`.
    pub source_identity: Option<String>,
    /// `sessionContext.ec2RoleDelivery` is present ("1.0" or "2.0": the credentials came from
    /// IMDSv1 or IMDSv2). Only its presence matters, so any non-null value counts.
    pub ec2_role_delivery: bool,
}

/// Where the records go, one at a time, in file order.
pub(super) trait Sink {
    fn record(&mut self, record: Record);
}

/// gzip's two magic bytes (RFC 1952 §2.3.1).
const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];
const BUFFER: usize = 64 * 1024;

/// Reads one file's records into `sink`. `Err` says why the file could not be read to its end;
/// the records before the failure have already been handed to `sink`.
pub(super) fn read_stream(mut reader: impl Read, sink: &mut dyn Sink) -> Result<(), String> {
    let mut magic = [0u8; 2];
    let n = read_up_to(&mut reader, &mut magic).map_err(|e| format!("read error: {e}"))?;
    let head = io::Cursor::new(magic).take(n as u64);
    if n == 2 && magic == GZIP_MAGIC {
        // Multi-member: concatenated gzip members are one stream (RFC 1952 §2.2).
        let decoded = MultiGzDecoder::new(head.chain(reader));
        read_json(BufReader::with_capacity(BUFFER, decoded), sink)
    } else {
        read_json(BufReader::with_capacity(BUFFER, head.chain(reader)), sink)
    }
}

/// Fills `buf` as far as the reader allows (short only at the end of the input).
fn read_up_to(reader: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        let Some(rest) = buf.get_mut(filled..) else {
            break;
        };
        match reader.read(rest) {
            Ok(0) => break,
            Ok(k) => filled += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// Top-level JSON values one after another, separated by whitespace: one for the delivery
/// format, one per line for JSON lines. One serde_json deserializer reads the whole file (its
/// line and column numbers are the file's); after each value, `end()` tells whether anything
/// but whitespace follows. `end()` fails with a syntax error ("trailing characters") exactly
/// when another value starts, and leaves that value's first byte unread, so the next value is
/// read from there. The deserializer owns the `BufReader`: std reads single bytes from an owned
/// `BufReader` about twice as fast as through a `&mut` (measured, benches/audit.sh).
fn read_json<R: Read>(mut reader: BufReader<R>, sink: &mut dyn Sink) -> Result<(), String> {
    skip_bom(&mut reader).map_err(read_error)?;
    match skip_whitespace(&mut reader).map_err(read_error)? {
        None => return Err("empty: no JSON value".into()),
        Some(b'{' | b'[') => {}
        Some(first) => {
            return Err(format!(
                "not a CloudTrail log: starts with {} instead of a JSON object or array",
                describe_byte(first)
            ));
        }
    }
    let mut de = serde_json::Deserializer::from_reader(reader);
    let mut values: u64 = 0;
    loop {
        values += 1;
        TopSeed { sink: &mut *sink }
            .deserialize(&mut de)
            .map_err(|e| describe_error(&e, values))?;
        match de.end() {
            Ok(()) => return Ok(()),
            Err(e) if e.is_syntax() => {}
            Err(e) => return Err(describe_error(&e, values)),
        }
    }
}

fn read_error(e: io::Error) -> String {
    format!("read error: {e}")
}

fn describe_byte(b: u8) -> String {
    if b.is_ascii_graphic() {
        format!("'{}'", char::from(b))
    } else {
        format!("byte 0x{b:02x}")
    }
}

fn describe_error(e: &serde_json::Error, value: u64) -> String {
    let what = match e.classify() {
        // A broken gzip stream surfaces here, as the decoder's read error.
        serde_json::error::Category::Io => "read error",
        serde_json::error::Category::Eof => "truncated",
        serde_json::error::Category::Syntax => "invalid JSON",
        serde_json::error::Category::Data => "not a CloudTrail log",
    };
    if value > 1 {
        format!("{what}: {e} (in top-level JSON value {value})")
    } else {
        format!("{what}: {e}")
    }
}

/// A UTF-8 byte order mark some exporters write before the first value. Byte by byte: a buffer
/// may hold fewer than three bytes. (A partial mark is consumed, and the file then fails as
/// not starting with JSON, which it does not either way.)
fn skip_bom(reader: &mut impl BufRead) -> io::Result<()> {
    for expected in [0xef, 0xbb, 0xbf] {
        if reader.fill_buf()?.first() != Some(&expected) {
            break;
        }
        reader.consume(1);
    }
    Ok(())
}

/// Consumes JSON whitespace; returns the next byte without consuming it, `None` at the end.
fn skip_whitespace(reader: &mut impl BufRead) -> io::Result<Option<u8>> {
    loop {
        let buf = reader.fill_buf()?;
        if buf.is_empty() {
            return Ok(None);
        }
        let len = buf.len();
        match buf
            .iter()
            .position(|b| !matches!(b, b' ' | b'\t' | b'\r' | b'\n'))
        {
            Some(i) => {
                let next = buf.get(i).copied();
                reader.consume(i);
                return Ok(next);
            }
            None => reader.consume(len),
        }
    }
}

/// A top-level value: `{"Records": [...]}`, one event object, or an array of events.
struct TopSeed<'s> {
    sink: &'s mut dyn Sink,
}

impl<'de> DeserializeSeed<'de> for TopSeed<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for TopSeed<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(
            "a CloudTrail log ({\"Records\": [...]}), a CloudTrail event or an array of events",
        )
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<(), A::Error> {
        let (record, shape) = visit_record(map, Some(&mut *self.sink))?;
        if shape.records {
            Ok(())
        } else if shape.event {
            self.sink.record(record);
            Ok(())
        } else {
            Err(de::Error::custom(
                "an object with neither Records nor CloudTrail event fields (a digest file?)",
            ))
        }
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<(), A::Error> {
        stream_records(seq, self.sink)
    }
}

fn stream_records<'de, A: SeqAccess<'de>>(mut seq: A, sink: &mut dyn Sink) -> Result<(), A::Error> {
    while let Some(record) = seq.next_element::<Record>()? {
        sink.record(record);
    }
    Ok(())
}

/// The value of `Records`: streamed, each record handed over as soon as it is read.
struct RecordsSeed<'s> {
    sink: &'s mut dyn Sink,
}

impl<'de> DeserializeSeed<'de> for RecordsSeed<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for RecordsSeed<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("Records: an array of CloudTrail records")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<(), A::Error> {
        stream_records(seq, self.sink)
    }
}

impl<'de> de::Deserialize<'de> for Record {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(RecordVisitor)
    }
}

struct RecordVisitor;

impl<'de> Visitor<'de> for RecordVisitor {
    type Value = Record;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a CloudTrail record (an object)")
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Record, A::Error> {
        visit_record(map, None).map(|(record, _)| record)
    }
}

/// What kind of object [`visit_record`] saw.
#[derive(Default)]
struct Shape {
    records: bool,
    event: bool,
}

const RECORD_KEYS: &[&str] = &[
    "Records",
    "eventTime",
    "eventSource",
    "eventName",
    "errorCode",
    "errorMessage",
    "sourceIPAddress",
    "vpcEndpointId",
    "recipientAccountId",
    "userIdentity",
];

/// Reads a record's fields; with a sink, a `Records` key is a delivery file's array, streamed
/// into it (a record inside `Records` has no `Records` of its own: the key is ignored there).
fn visit_record<'de, A: MapAccess<'de>>(
    mut map: A,
    mut sink: Option<&mut dyn Sink>,
) -> Result<(Record, Shape), A::Error> {
    let mut r = Record::default();
    let mut shape = Shape::default();
    while let Some(key) = map.next_key_seed(KeySeed(RECORD_KEYS))? {
        let field = match key {
            Some(0) => {
                match sink.as_deref_mut() {
                    Some(sink) => {
                        map.next_value_seed(RecordsSeed { sink })?;
                        shape.records = true;
                    }
                    None => {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
                continue;
            }
            Some(1) => &mut r.event_time,
            Some(2) => &mut r.event_source,
            Some(3) => &mut r.event_name,
            Some(4) => &mut r.error_code,
            Some(5) => &mut r.error_message,
            Some(6) => &mut r.source_ip_address,
            Some(7) => &mut r.vpc_endpoint_id,
            Some(8) => &mut r.recipient_account_id,
            Some(_) => {
                r.user_identity = map.next_value::<Option<UserIdentity>>()?;
                shape.event = true;
                continue;
            }
            None => {
                map.next_value::<IgnoredAny>()?;
                continue;
            }
        };
        *field = map.next_value::<Option<String>>()?;
        shape.event = true;
    }
    Ok((r, shape))
}

const IDENTITY_KEYS: &[&str] = &["type", "arn", "invokedBy", "sessionContext"];
const SESSION_KEYS: &[&str] = &["sourceIdentity", "ec2RoleDelivery"];

impl<'de> de::Deserialize<'de> for UserIdentity {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(IdentityVisitor)
    }
}

struct IdentityVisitor;

impl<'de> Visitor<'de> for IdentityVisitor {
    type Value = UserIdentity;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("userIdentity: an object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<UserIdentity, A::Error> {
        let mut u = UserIdentity::default();
        while let Some(key) = map.next_key_seed(KeySeed(IDENTITY_KEYS))? {
            match key {
                Some(0) => u.kind = map.next_value()?,
                Some(1) => u.arn = map.next_value()?,
                Some(2) => {
                    let by: Option<String> = map.next_value()?;
                    u.invoked_by = by.is_some_and(|s| !s.is_empty());
                }
                Some(_) => {
                    if let Some(session) = map.next_value::<Option<SessionContext>>()? {
                        u.source_identity = session.source_identity;
                        u.ec2_role_delivery = session.ec2_role_delivery;
                    }
                }
                None => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(u)
    }
}

#[derive(Default)]
struct SessionContext {
    source_identity: Option<String>,
    ec2_role_delivery: bool,
}

impl<'de> de::Deserialize<'de> for SessionContext {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(SessionVisitor)
    }
}

struct SessionVisitor;

impl<'de> Visitor<'de> for SessionVisitor {
    type Value = SessionContext;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("sessionContext: an object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<SessionContext, A::Error> {
        let mut s = SessionContext::default();
        while let Some(key) = map.next_key_seed(KeySeed(SESSION_KEYS))? {
            match key {
                Some(0) => s.source_identity = map.next_value()?,
                Some(_) => s.ec2_role_delivery = map.next_value::<Option<IgnoredAny>>()?.is_some(),
                None => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(s)
    }
}

/// A map key as its index in a list of names (ASCII case ignored), `None` for any other key;
/// nothing is allocated.
struct KeySeed(&'static [&'static str]);

impl<'de> DeserializeSeed<'de> for KeySeed {
    type Value = Option<usize>;
    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Option<usize>, D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for KeySeed {
    type Value = Option<usize>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a field name")
    }

    fn visit_str<E: de::Error>(self, key: &str) -> Result<Option<usize>, E> {
        Ok(self
            .0
            .iter()
            .position(|name| name.eq_ignore_ascii_case(key)))
    }
}
