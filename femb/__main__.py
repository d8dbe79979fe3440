from femb.cli import main

raise SystemExit(main())
