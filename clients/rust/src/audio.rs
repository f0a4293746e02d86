//! Audio as a real-time pipeline wants it: `f32` samples, whichever wire
//! format the broker sent.

use crate::event::{AudioSpec, SampleFormat};

/// A whole utterance: interleaved `f32` samples in [-1, 1), their rate and
/// channel count (the shape of the voice pipeline's `PiperAudio`).
///
/// Returned by [`crate::Client::synthesize`] and
/// [`crate::Client::synthesize_request`].
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Audio {
    /// Interleaved samples in [-1, 1).
    pub samples: Vec<f32>,
    /// Hz.
    pub sample_rate: u32,
    /// Interleaved channels (the broker sends mono: 1).
    pub channels: u16,
}

impl Audio {
    /// An empty utterance in the format `spec` announces.
    pub fn empty(spec: AudioSpec) -> Audio {
        Audio {
            samples: Vec::new(),
            sample_rate: spec.sample_rate,
            channels: spec.channels,
        }
    }

    /// Frames (one sample of every channel).
    pub fn frames(&self) -> usize {
        self.samples.len() / usize::from(self.channels.max(1))
    }

    /// Length in seconds (0 when the rate is unknown).
    pub fn duration_s(&self) -> f64 {
        if self.sample_rate == 0 {
            return 0.0;
        }
        self.frames() as f64 / f64::from(self.sample_rate)
    }
}

/// Decode little-endian PCM into `f32` samples in [-1, 1): 16-bit samples
/// are divided by 32768, floats are taken as they are. A trailing partial
/// sample is ignored (the client never yields one).
pub fn pcm_to_f32(pcm: &[u8], format: SampleFormat) -> Vec<f32> {
    let mut out = Vec::with_capacity(pcm.len() / format.sample_width());
    extend_f32(&mut out, pcm, format);
    out
}

/// [`pcm_to_f32`] appending to `out`; returns how many samples were appended.
pub fn extend_f32(out: &mut Vec<f32>, pcm: &[u8], format: SampleFormat) -> usize {
    let before = out.len();
    match format {
        SampleFormat::S16le => out.extend(
            pcm.chunks_exact(2)
                .map(|b| f32::from(i16::from_le_bytes([b[0], b[1]])) / 32768.0),
        ),
        SampleFormat::F32le => out.extend(
            pcm.chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        ),
    }
    out.len() - before
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Event;

    #[test]
    fn s16_and_f32_decode_to_the_same_floats() {
        let s16: Vec<u8> = [0i16, 16384, -32768, 32767]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        assert_eq!(
            pcm_to_f32(&s16, SampleFormat::S16le),
            vec![0.0, 0.5, -1.0, 32767.0 / 32768.0]
        );
        let f32s: Vec<u8> = [0.0f32, 0.5, -1.0, 0.25].iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(pcm_to_f32(&f32s, SampleFormat::F32le), vec![0.0, 0.5, -1.0, 0.25]);
        assert_eq!(
            pcm_to_f32(&[1, 2, 3], SampleFormat::S16le).len(),
            1,
            "partial sample ignored"
        );
    }

    #[test]
    fn audio_events_give_f32_whatever_the_format() {
        let a = Event::Audio {
            seq: 0,
            pcm: 16384i16.to_le_bytes().to_vec(),
            format: SampleFormat::S16le,
        };
        let b = Event::Audio {
            seq: 0,
            pcm: 0.5f32.to_le_bytes().to_vec(),
            format: SampleFormat::F32le,
        };
        assert_eq!(a.samples_f32(), Some(vec![0.5]));
        assert_eq!(b.samples_f32(), Some(vec![0.5]));
        let mut out = vec![1.0];
        assert_eq!(b.extend_f32(&mut out), 1);
        assert_eq!(out, vec![1.0, 0.5]);
        assert_eq!(Event::Mark { segment: 0, end: 1 }.samples_f32(), None);
    }

    #[test]
    fn audio_length() {
        let a = Audio {
            samples: vec![0.0; 24000],
            sample_rate: 24000,
            channels: 1,
        };
        assert_eq!(a.frames(), 24000);
        assert!((a.duration_s() - 1.0).abs() < 1e-9);
        assert_eq!(Audio::default().duration_s(), 0.0);
    }
}
