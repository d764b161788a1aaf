//! What the guest prints: the test app's `HBAPP {json}` lines and the init script's `HBINIT`
//! lines on the serial console.

use serde_json::Value;

/// Prefix of the test app's lines.
pub const APP_PREFIX: &str = "HBAPP ";
/// Prefix of the bare-metal guest's lines (`baremetal-guest/`).
pub const METAL_PREFIX: &str = "HBMETAL ";

/// The test app's lines in console text, parsed, in order. A line garbled by interleaved kernel
/// output is skipped.
pub fn app_lines(text: &str) -> Vec<Value> {
    prefixed_lines(text, APP_PREFIX)
}

/// The bare-metal guest's lines in console text, parsed, in order.
pub fn metal_lines(text: &str) -> Vec<Value> {
    prefixed_lines(text, METAL_PREFIX)
}

/// The JSON after `prefix` on each line that has it, parsed; unparsable lines are skipped.
fn prefixed_lines(text: &str, prefix: &str) -> Vec<Value> {
    text.lines()
        .filter_map(|l| {
            let at = l.find(prefix)?;
            serde_json::from_str::<Value>(l[at + prefix.len()..].trim_end()).ok()
        })
        .collect()
}

/// The `msg` field of an app line (`token`, `event`, `refused`, `alive`, ...).
pub fn msg(v: &Value) -> &str {
    v["msg"].as_str().unwrap_or("")
}

/// The `event` name of an app `event` line (`connected`, `rebound`, `license_refused`, ...).
pub fn event_name(v: &Value) -> &str {
    if msg(v) == "event" {
        v["event"]["event"].as_str().unwrap_or("")
    } else {
        ""
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_app_lines_and_skips_garbage() {
        let text = "[    1.0] kernel says hi\r\nHBAPP {\"msg\":\"start\",\"pid\":7}\r\n\
                    HBINIT x\r\nHBAPP {\"msg\":\"event\",\"event\":{\"event\":\"rebound\"}}\r\n\
                    HBAPP {\"msg\":\"tok[  2.0] garbled\r\n";
        let l = app_lines(text);
        assert_eq!(l.len(), 2);
        assert_eq!(msg(&l[0]), "start");
        assert_eq!(l[0]["pid"], 7);
        assert_eq!(event_name(&l[1]), "rebound");
        assert_eq!(event_name(&l[0]), "");
        // The bare-metal guest's lines have their own prefix; each kind only finds its own.
        let text = "hostbind: token VERIFIED\nHBMETAL {\"msg\":\"exit\",\"code\":16}\n\
                    HBAPP {\"msg\":\"start\"}\n";
        let m = metal_lines(text);
        assert_eq!(m.len(), 1);
        assert_eq!(msg(&m[0]), "exit");
        assert_eq!(m[0]["code"], 16);
        assert_eq!(app_lines(text).len(), 1);
    }
}
