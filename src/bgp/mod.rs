//! BGP speaker: sessions to the policy's peers, flowspec and RTBH announcements.
//!
//! Not built yet (issue "BGP"). Nothing here announces anything.
